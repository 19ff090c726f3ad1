"""MoE router weights from prompts, as mergekit-moe computes them: per expert the base model's representation
of its positive prompts minus its negative ones, unit-normalised per layer; and, after the build, which
experts each prompt is routed to."""
from __future__ import annotations

import math
from pathlib import Path

import torch

from ..checkpoint import Checkpoint
from ..errors import WeightsmithError
from ..progress import ProgressFn, track
from .moe_config import Expert


def load_prompt_tokenizer(base: Path):
    """The base tokenizer set up as mergekit-moe sets it: left padding, padded with BOS (else EOS)."""
    from transformers import AutoTokenizer

    try:
        tok = AutoTokenizer.from_pretrained(str(base))
    except (OSError, ValueError) as exc:
        raise WeightsmithError(f"{base}: no tokenizer found there ({exc.__class__.__name__}); the base model's "
                               "tokenizer reads the prompts and is copied to the MoE") from None
    tok.padding_side = "left"
    tok.pad_token_id = tok.bos_token_id
    if tok.pad_token_id is None:
        tok.pad_token = tok.eos_token
    return tok


def _tokenize(tok, prompts: list[str]):
    return tok([(tok.bos_token or "") + p for p in prompts], return_tensors="pt", padding=True,
               add_special_tokens=False)


def _hidden_fn(base: Path, mode: str, dtype: torch.dtype, device):
    """Prompts -> (layers, hidden): each layer's input at the last token (hidden, hidden_last) or averaged over
    the padded sequence (hidden_avg), averaged over the prompts."""
    from ..loading import load

    model = load(base, device=device, dtype=dtype)

    @torch.no_grad()
    def run(batch):
        out = model(**batch.to(device), output_hidden_states=True, return_dict=True)
        h = torch.stack(out.hidden_states[:-1])  # (layers, prompts, tokens, hidden)
        h = h.sum(dim=2) / h.shape[2] if mode == "hidden_avg" else h[:, :, -1, :]
        return h.sum(dim=1) / h.shape[1]
    return run


def _cheap_fn(base: Checkpoint, layers: int):
    """Prompts -> (layers, hidden): the unit-normalised sum of the prompts' token embeddings, every layer alike."""
    embed = base.read("model.embed_tokens.weight").float()

    def run(batch):
        onehot = torch.nn.functional.one_hot(batch["input_ids"], num_classes=embed.shape[0]).float()
        h = ((onehot @ embed) * batch["attention_mask"].unsqueeze(-1)).sum(dim=1).sum(dim=0, keepdim=True)
        return (h / h.norm(dim=-1, keepdim=True).clamp(min=1e-8)).repeat(layers, 1)
    return run


def gate_vectors(base: Path, experts: list[Expert], mode: str, *, layers: int, hidden: int,
                 hidden_dtype: torch.dtype, device, progress: ProgressFn | None = None) -> torch.Tensor:
    """(layers, experts, hidden) router rows. Random modes draw from torch's global generator, as mergekit does,
    so one seed gives mergekit's draw."""
    if mode == "random":
        return torch.randn((layers, len(experts), hidden))
    if mode == "uniform_random":  # nn.Linear's default initialisation
        scale = math.sqrt(1.0 / hidden)
        return torch.rand((layers, len(experts), hidden)) * 2 * scale - scale
    tok = load_prompt_tokenizer(base)
    fn = (_cheap_fn(Checkpoint(base), layers) if mode == "cheap_embed"
          else _hidden_fn(base, mode, hidden_dtype, device))
    vecs = []
    for e in track(progress, "expert prompts", experts):
        h = fn(_tokenize(tok, e.positive_prompts))
        if e.negative_prompts:
            h -= fn(_tokenize(tok, e.negative_prompts))
        h /= h.norm(p=2, dim=-1, keepdim=True).clamp(min=1e-8)
        vecs.append(h.cpu())
    return torch.stack(vecs, dim=0).permute(1, 0, 2)


def degenerate_layers(gates: torch.Tensor, threshold: float = 5.0) -> list[int]:
    """Layers whose router rows are nearly dependent (condition number above ``threshold``): some experts
    there will rarely be chosen."""
    return [i for i in range(gates.shape[0]) if torch.linalg.cond(gates[i].float()) > threshold]


@torch.no_grad()
def route_prompts(model_path: Path, prompts: list[str], *, device, progress: ProgressFn | None = None) -> dict:
    """For each prompt and layer, the share of its tokens routed to each expert (top-k of the router)."""
    from ..eval import load_tokenizer
    from ..loading import load

    model = load(model_path, device=device, dtype=torch.float32)
    tok = load_tokenizer(model_path)
    cfg = model.config
    k = getattr(cfg, "num_experts_per_tok", 2)
    experts = getattr(cfg, "num_local_experts", None) or cfg.num_experts
    rows = []
    for prompt in track(progress, "routing", prompts):
        ids = tok(prompt, return_tensors="pt").to(device)
        logits = model(**ids, output_router_logits=True).router_logits
        shares = []
        for layer in logits:  # (tokens, experts)
            top = layer.float().topk(k, dim=-1).indices.flatten()
            counts = torch.bincount(top, minlength=experts).float() / layer.shape[0]
            shares.append([round(v, 4) for v in counts.tolist()])
        rows.append({"prompt": prompt, "tokens": int(ids["input_ids"].shape[1]), "shares": shares})
    return {"model": str(model_path), "experts": experts, "experts_per_token": k, "prompts": rows}


def explain_routing(model_path: str | Path, data: str | Path, *, device: str = "auto",
                    progress: ProgressFn | None = None) -> dict:
    """``route_prompts`` over the prompts of a text file (one per non-empty line) or .jsonl (its 'text')."""
    from ..checkpoint.textfile import read_text_file
    from ..device import resolve_device
    from ..data import load_texts

    path = Path(data)
    if not path.is_file():
        raise WeightsmithError(f"{path}: prompts file not found")
    prompts = (load_texts(path) if path.suffix == ".jsonl"
               else [ln.strip() for ln in read_text_file(path, "prompts").splitlines() if ln.strip()])
    if not prompts:
        raise WeightsmithError(f"{path}: no prompts in it")
    open_moe(model_path)
    return route_prompts(Path(model_path), prompts, device=resolve_device(device), progress=progress)


def open_moe(model_path: str | Path) -> Checkpoint:
    """The checkpoint of a MoE folder (its config names experts per token), or an error saying it is not one."""
    ckpt = Checkpoint(model_path)
    cfg = ckpt.config or {}
    if not (cfg.get("num_local_experts") or cfg.get("num_experts")):
        raise WeightsmithError(f"{model_path}: not a Mixture of Experts (its config.json has no num_local_experts "
                               "or num_experts)")
    return ckpt
