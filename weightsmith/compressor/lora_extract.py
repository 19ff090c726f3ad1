"""LoRA extraction: each linear/embedding layer's (fine-tune − base) delta as a truncated SVD B·A, written as a
standard PEFT adapter folder. The low-rank compression of a task vector; the module choices, names and
adapter config follow mergekit-extract-lora 0.1.5 so its adapters and these are interchangeable."""
from __future__ import annotations

import re
import time
import warnings
from dataclasses import dataclass
from pathlib import Path

import torch

from ..checkpoint import Checkpoint, output_folder
from ..checkpoint.adapters import PREFIX, write_adapter
from ..checkpoint.card import write_model_card
from ..checkpoint.trust import open_model
from ..device import resolve_device
from ..errors import WeightsmithError
from ..progress import ProgressFn, track
from ..stage_options import ExtractLoraOptions

OVERSAMPLE = 16     # extra columns of the randomized range finder: its error falls off quickly with them
LOWRANK_RATIO = 8   # auto uses the randomized SVD only when the matrix is this many times wider than the rank
FLAT = 0.5          # ... and only when the spectrum has fallen below this share of s[rank] within the oversampling


@dataclass
class Target:
    """One module of the fine-tune and what the adapter keeps of it."""
    module: str
    kind: str              # "lora" (linear), "embedding" (delta decomposed transposed, as PEFT stores it), "full"
    tensor: str            # the checkpoint tensor holding its weight (a tied lm_head reads the embedding)
    bias: str | None = None


def _meta_model(ckpt: Checkpoint):
    from ..checkpoint.exact import build_config, model_class

    cls = model_class(ckpt.config)
    cfg = build_config(ckpt.config, cls, ckpt.path)
    with torch.device("meta"):
        return cls._from_config(cfg) if hasattr(cls, "_from_config") else cls.from_config(cfg)


def _wanted(name: str, opts: ExtractLoraOptions) -> bool:
    if opts.include_regex and not any(re.search(r, name) for r in opts.include_regex):
        return False
    return not any(re.search(r, name) for r in opts.exclude_regex or [])


def _weight_tensor(ckpt: Checkpoint, name: str, module, embed_in_name: str, embed_out) -> str | None:
    if f"{name}.weight" in ckpt:
        return f"{name}.weight"
    tied = module is embed_out and f"{embed_in_name}.weight" in ckpt
    return f"{embed_in_name}.weight" if tied else None


def plan_extraction(ft: Checkpoint, base: Checkpoint, opts: ExtractLoraOptions) -> tuple[list[Target], list[str], list[str]]:
    """The targets in module order, the modules_to_save names and notes on what was moved to full rank."""
    from torch import nn

    model = _meta_model(ft)
    embed_in, embed_out = model.get_input_embeddings(), model.get_output_embeddings()
    embed_in_name = next(n for n, m in model.named_modules() if m is embed_in)
    embed_lora = opts.embed_lora and base.info(f"{embed_in_name}.weight").shape == embed_in.weight.shape
    notes = [] if embed_lora == opts.embed_lora else ["vocabulary sizes differ: embeddings saved at full rank"]
    save, targets = list(opts.save_module or []), []
    for name, module in model.named_modules():
        tensor = _weight_tensor(ft, name, module, embed_in_name, embed_out)
        if tensor is None:
            continue
        key = name.split(".")[-1]
        is_embed = module is embed_in or module is embed_out or isinstance(module, nn.Embedding)
        excluded = any(re.search(r, name) for r in opts.exclude_regex or [])
        if is_embed and not embed_lora and not excluded and key not in save:
            save.append(key)
            notes.append(f"{key}: embedding saved at full rank")
        bias = f"{name}.bias" if f"{name}.bias" in ft else None
        if name in save or key in save:
            targets.append(Target(name, "full", tensor, bias))
        elif not _wanted(name, opts):
            continue
        elif isinstance(module, (nn.Linear, nn.Embedding)):
            targets.append(Target(name, "embedding" if isinstance(module, nn.Embedding) else "lora", tensor, bias))
        elif not opts.skip_undecomposable:
            if key not in save:
                save.append(key)
                notes.append(f"{key}: {type(module).__name__} is not linear, saved at full rank")
            targets.append(Target(name, "full", tensor, bias))
    return targets, save, notes


def check_targets(targets: list[Target], ft: Checkpoint, base: Checkpoint) -> None:
    """Every decomposed tensor (and bias) exists in the base with the fine-tune's shape: checked before reading."""
    for t in targets:
        if t.kind == "full":
            continue
        for name in filter(None, (t.tensor, t.bias)):
            if name not in base:
                raise WeightsmithError(f"{base.path}: tensor {name!r} of the fine-tune is missing from the base; "
                                       "exclude the module or save it at full rank")
            if base.info(name).shape != ft.info(name).shape:
                raise WeightsmithError(f"tensor {name!r}: shape {tuple(ft.info(name).shape)} in {ft.path} but "
                                       f"{tuple(base.info(name).shape)} in {base.path}; is this the right base?")
        if len(ft.info(t.tensor).shape) != 2:
            raise WeightsmithError(f"{ft.path}: tensor {t.tensor!r} is not a matrix; exclude module {t.module!r}")


def energy_rank(s: torch.Tensor, total: float, energy: float) -> int:
    """The smallest k with sum(s[:k]^2) >= energy * total (total: the squared Frobenius norm of the matrix)."""
    kept = torch.cumsum(s.double() ** 2, 0)
    k = int((kept < energy * total).sum().item()) + 1
    return min(k, s.numel())


def _use_lowrank(opts: ExtractLoraOptions, rank: int, width: int) -> bool:
    return opts.svd == "lowrank" or (opts.svd == "auto" and width >= LOWRANK_RATIO * (rank + OVERSAMPLE))


def decompose(delta: torch.Tensor, opts: ExtractLoraOptions) -> tuple[torch.Tensor, torch.Tensor]:
    """A (rank x in) and B (out x rank) with B·A the best rank-r approximation of ``delta`` (float32)."""
    cap = min(opts.max_rank, min(delta.shape))
    u = None
    if _use_lowrank(opts, cap, min(delta.shape)):
        u, s, v = torch.svd_lowrank(delta, q=min(cap + OVERSAMPLE, min(delta.shape)), niter=4)
        vh = v.T
        if opts.svd == "auto" and s[-1] > FLAT * s[cap - 1]:
            u = None  # no gap after the kept rank: which directions to keep is ill-posed for the sketch
    if u is None:
        u, s, vh = torch.linalg.svd(delta, full_matrices=False)
    rank = cap
    if opts.sv_epsilon > 0:
        rank = min(rank, int((s > opts.sv_epsilon).sum().item()))
    if opts.rank == "auto":
        rank = min(rank, energy_rank(s, float(delta.double().square().sum()), opts.energy))
    s = s[:rank]
    if opts.distribute_scale:
        root = s.sqrt()
        return root[:, None] * vh[:rank], u[:, :rank] * root[None, :]
    return s[:, None] * vh[:rank], u[:, :rank]


def _lora_tensors(t: Target, ft: Checkpoint, base: Checkpoint, opts: ExtractLoraOptions, dev) -> dict:
    out_dtype = torch.promote_types(ft.info(t.tensor).torch_dtype, base.info(t.tensor).torch_dtype)
    delta = ft.read(t.tensor, dtype=torch.float32, device=dev) - base.read(t.tensor, dtype=torch.float32, device=dev)
    a, b = decompose(delta.T if t.kind == "embedding" else delta, opts)
    if a.shape[0] == 0:  # nothing above sv_epsilon: the module is unchanged, and PEFT refuses rank 0
        return {}
    kind, suffix = ("lora_embedding", "") if t.kind == "embedding" else ("lora", ".weight")
    prefix = f"{PREFIX}{t.module}"
    res = {f"{prefix}.{kind}_A{suffix}": a.to("cpu", out_dtype), f"{prefix}.{kind}_B{suffix}": b.to("cpu", out_dtype)}
    if t.bias is not None:  # as mergekit stores it; PEFT's lora_bias would need a bias on every target module
        res[f"{prefix}.lora_B.bias"] = (ft.read(t.bias, dtype=torch.float32) - base.read(t.bias, dtype=torch.float32)
                                        ).to(out_dtype)
    return res


def _full_tensors(t: Target, ft: Checkpoint) -> dict:
    res = {f"{PREFIX}{t.module}.weight": ft.read(t.tensor)}
    if t.bias is not None:
        res[f"{PREFIX}{t.bias}"] = ft.read(t.bias)
    return res


def lora_config(base: Path, ranks: dict[str, int], save: list[str]) -> dict:
    """PEFT's LoraConfig as mergekit-extract-lora writes it: alpha equal to each rank, so B·A is added unscaled."""
    r = max(ranks.values())
    pattern = {m: k for m, k in ranks.items() if k != r}
    cfg = {"base_model_name_or_path": str(base), "peft_type": "LORA", "use_rslora": False,
           "target_modules": sorted({m.split(".")[-1] for m in ranks}), "modules_to_save": save,
           "task_type": "CAUSAL_LM", "r": r, "lora_alpha": r, "rank_pattern": pattern, "alpha_pattern": pattern,
           "lora_dropout": 0.0, "fan_in_fan_out": False, "inference_mode": True}
    return cfg


def _extract(targets: list[Target], ft: Checkpoint, base: Checkpoint, opts: ExtractLoraOptions, dev,
             progress: ProgressFn | None) -> tuple[dict, dict[str, int]]:
    tensors: dict[str, torch.Tensor] = {}
    ranks: dict[str, int] = {}
    for t in track(progress, "extract-lora", targets):
        part = _full_tensors(t, ft) if t.kind == "full" else _lora_tensors(t, ft, base, opts, dev)
        if t.kind != "full" and part:
            ranks[t.module] = next(iter(part.values())).shape[0]
        tensors.update(part)
    return tensors, ranks


def extract_lora(finetuned: str | Path, out: str | Path, opts: ExtractLoraOptions | None = None, *,
                 device: str = "auto", seed: int = 0, force: bool = False, progress: ProgressFn | None = None,
                 **values) -> dict:
    """Write the PEFT LoRA adapter that turns ``opts.base`` into (approximately) ``finetuned`` at ``out``."""
    o = ExtractLoraOptions.build(opts, **values)
    ft, base = open_model(finetuned), open_model(o.base)
    if ft.config is None or base.config is None:
        raise WeightsmithError(f"{ft.path if ft.config is None else base.path}: no config.json; a transformers "
                               "model folder is needed to tell linear layers from others")
    targets, save, notes = plan_extraction(ft, base, o)
    check_targets(targets, ft, base)
    dev = resolve_device(device)
    torch.manual_seed(seed)  # the randomized SVD's test matrices
    start = time.perf_counter()
    with output_folder(out, inputs=[ft.path, base.path], force=force) as tmp:
        tensors, ranks = _extract(targets, ft, base, o, dev, progress)
        if not ranks:
            raise WeightsmithError(f"{ft.path}: no linear or embedding layer left to decompose; check the "
                                   "include/exclude patterns")
        size = write_adapter(tmp, tensors, lora_config(base.path, ranks, save))
        write_model_card(tmp, stage="extract-lora", method="lora-svd", inputs=[str(base.path), str(ft.path)],
                         parameters=o.to_dict(), tags=["lora", "peft"],
                         notes="A PEFT LoRA adapter for the first input: `PeftModel.from_pretrained(base, folder)`.")
    info = {"out": str(out), "modules": len(ranks), "full_rank_modules": sorted(save), "r": max(ranks.values()),
            "ranks": ranks, "adapter_params": sum(v.numel() for v in tensors.values()), "adapter_bytes": size,
            "finetune_params": ft.num_params, "seconds": time.perf_counter() - start, "notes": notes}
    if o.data is not None:
        info["eval"] = evaluate_adapter(base.path, ft.path, Path(out), o, device=dev, progress=progress)
    return info


def evaluate_adapter(base: Path, finetuned: Path, adapter: Path, opts: ExtractLoraOptions, *, device,
                     progress: ProgressFn | None = None) -> list[dict]:
    """Held-out perplexity of the base, the base with the adapter merged by PEFT, and the fine-tune."""
    from peft import PeftModel

    from ..eval.run import evaluate_model
    from ..loading import load
    from ..stage_options import EvalOptions

    eo = EvalOptions(data=opts.data, max_tokens=opts.max_tokens, tokenizer=opts.tokenizer or finetuned)
    with warnings.catch_warnings():  # peft calls a transformers API that transformers 5 deprecates
        warnings.simplefilter("ignore", FutureWarning)
        merged = PeftModel.from_pretrained(load(base, device=device), str(adapter)).merge_and_unload().eval()
    rows = [("base", base, None), ("base + adapter", adapter, merged), ("fine-tune", finetuned, None)]
    out = []
    for role, path, model in rows:
        row = evaluate_model(path, eo, device=device, model=model, progress=progress).to_dict()
        out.append({"role": role, **row})
    return out
