"""`weightsmith moe`: a Mixtral or Qwen2-MoE checkpoint assembled from dense models, as mergekit-moe builds it:
attention, norms and embeddings from the base, each expert's MLP from its model, routers from prompts.
Streamed layer by layer: memory holds one layer's MLPs of every expert (plus the prompts' states)."""
from __future__ import annotations

import json
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from ..checkpoint import Checkpoint, ShardedWriter, check_output, output_folder, parse_size, write_config
from ..checkpoint.card import write_model_card
from ..checkpoint.trust import open_model
from ..device import resolve_device, resolve_dtype
from ..errors import WeightsmithError
from ..progress import ProgressFn, track
from ..stage_options import MoeOptions
from .moe_config import RANDOM_MODES, Expert, MoeConfig, check_moe_config, output_architecture, parse_moe_config
from .moe_router import degenerate_layers, gate_vectors, load_prompt_tokenizer

MLP = ("gate_proj", "up_proj", "down_proj")
QWEN_MLP_ORDER = ("down_proj", "gate_proj", "up_proj")  # mergekit's Qwen2 weight order, which its noise draws follow


@dataclass
class Plan:
    """Everything decided before a tensor is read."""
    cfg: MoeConfig
    arch: str
    base: Checkpoint
    experts: list[Checkpoint]
    shared: list[Checkpoint]
    layers: int
    out_dtype: torch.dtype | None
    out_config: dict


def load_moe_config(path: str | Path) -> MoeConfig:
    """Parse the YAML file; relative model folders are taken relative to it when they exist there."""
    from ..checkpoint.textfile import read_text_file

    path = Path(path)
    if not path.is_file():
        raise WeightsmithError(f"{path}: MoE config file not found")
    return parse_moe_config(read_text_file(path, "MoE config"), str(path), path.resolve().parent)


def resolve_models(cfg: MoeConfig, source: str) -> MoeConfig:
    """``cfg`` with each model reference resolved to its folder (a Hub name from the cache or downloaded,
    ``model+adapter`` applied: ``checkpoint.sources``); ``cfg.text`` keeps the names as written."""
    import copy

    from ..checkpoint.sources import resolve_model

    out = copy.deepcopy(cfg)
    out.base_model = str(resolve_model(cfg.base_model, what=f"{source}: base_model"))
    for key in ("experts", "shared_experts"):
        for i, e in enumerate(getattr(out, key)):
            e.source_model = str(resolve_model(e.source_model, what=f"{source}: {key}[{i}]"))
    return out


def _mlp_name(layer: int, proj: str) -> str:
    return f"model.layers.{layer}.mlp.{proj}.weight"


def _check_tensors(base: Checkpoint, models: list[Checkpoint], layers: int) -> None:
    for layer in range(layers):
        for proj in MLP:
            name = _mlp_name(layer, proj)
            shape = base.info(name).shape if name in base else None
            for m in models:
                if name not in m:
                    raise WeightsmithError(f"{m.path}: tensor {name!r} is missing; experts need the base's MLP layout")
                if shape is not None and m.info(name).shape != shape:
                    raise WeightsmithError(f"tensor {name!r}: shape {tuple(m.info(name).shape)} in {m.path} but "
                                           f"{tuple(shape)} in the base; experts must match the base's size")


def _out_dtype(cfg: MoeConfig, base: Checkpoint) -> torch.dtype | None:
    name = cfg.dtype or base.config.get("dtype") or base.config.get("torch_dtype")
    return resolve_dtype(name) if isinstance(name, str) else None


def plan_moe(cfg: MoeConfig, source: str, allow_all_same: bool) -> Plan:
    check_moe_config(cfg, source, allow_all_same)
    cfg = resolve_models(cfg, source)
    opened = {p: open_model(p) for p in dict.fromkeys(cfg.models())}
    for p, ck in opened.items():
        if ck.config is None:
            raise WeightsmithError(f"{p}: no config.json; experts and base must be transformers model folders")
    arch = output_architecture(cfg, [opened[p].config.get("model_type") for p in cfg.models()], source)
    base = opened[cfg.base_model]
    layers = int(base.config["num_hidden_layers"])
    experts = [opened[e.source_model] for e in cfg.experts]
    shared = [opened[e.source_model] for e in cfg.shared_experts]
    _check_tensors(base, experts + shared, layers)
    out_dtype = _out_dtype(cfg, base)
    return Plan(cfg, arch, base, experts, shared, layers, out_dtype, output_config(arch, cfg, base, out_dtype))


def output_config(arch: str, cfg: MoeConfig, base: Checkpoint, out_dtype: torch.dtype | None) -> dict:
    """config.json of the MoE: the base's config carried into MixtralConfig / Qwen2MoeConfig as mergekit does."""
    import transformers

    from ..checkpoint.exact import config_object, model_class

    base_cfg = config_object(base.config, model_class(base.config))
    if arch == "Mixtral":
        if not isinstance(base_cfg, transformers.MistralConfig):
            mistral = transformers.MistralConfig(**base_cfg.to_dict())
            mistral.sliding_window = None
            mistral.max_position_embeddings = base_cfg.max_position_embeddings
            base_cfg = mistral
        out = transformers.MixtralConfig(**base_cfg.to_dict())
        out.architectures, out.num_local_experts = ["MixtralForCausalLM"], len(cfg.experts)
    else:
        out = transformers.Qwen2MoeConfig(**base_cfg.to_dict())
        out.architectures, out.num_experts = ["Qwen2MoeForCausalLM"], len(cfg.experts)
        out.decoder_sparse_step, out.norm_topk_prob, out.use_sliding_window = 1, True, False
        out.shared_expert_intermediate_size = out.moe_intermediate_size = out.intermediate_size
    out.num_experts_per_tok = cfg.experts_per_token
    out.sliding_window = None
    if out_dtype is not None:
        out.dtype = out_dtype
    return json.loads(out.to_json_string(use_diff=True))


def _noised(t: torch.Tensor, e: Expert, residual: bool) -> torch.Tensor:
    """mergekit's per-expert perturbation: Gaussian noise (global generator), then the residual (down_proj) scale."""
    if e.noise_scale is not None:
        t = t + torch.randn_like(t) * e.noise_scale
    if residual and e.residual_scale is not None:
        t = t * e.residual_scale
    return t


def _cast(t: torch.Tensor, dtype: torch.dtype | None) -> torch.Tensor:
    return t.to(dtype) if dtype is not None else t


def _attention_entries(plan: Plan) -> list[tuple[str, tuple, torch.dtype]]:
    """The base's tensors outside the MLPs (Qwen2-MoE output: q/k/v biases, zero where the base has none)."""
    b = plan.base
    names = [n for n in b.names() if ".mlp." not in n and not n.endswith("rotary_emb.inv_freq")]
    entries = [(n, tuple(b.info(n).shape), plan.out_dtype or b.info(n).torch_dtype) for n in names]
    if plan.arch != "Mixtral":
        heads, kv = int(b.config["num_attention_heads"]), int(b.config.get("num_key_value_heads") or 0)
        head_dim = int(b.config["hidden_size"]) // heads
        for layer in range(plan.layers):
            for proj, n in (("q_proj", heads), ("k_proj", kv or heads), ("v_proj", kv or heads)):
                name = f"model.layers.{layer}.self_attn.{proj}.bias"
                if name not in b:
                    entries.append((name, (n * head_dim,), plan.out_dtype or torch.float32))
    return entries


def _fused(pre: str, parts: list[dict[str, torch.Tensor]], dtype: torch.dtype | None) -> dict[str, torch.Tensor]:
    """Experts as transformers 5 stores them: gate_up_proj (E, 2I, H) = [gate; up] per expert, down_proj (E, H, I)."""
    return {f"{pre}.experts.gate_up_proj": _cast(torch.stack([torch.cat([p["gate_proj"], p["up_proj"]]) for p in parts]),
                                                  dtype),
            f"{pre}.experts.down_proj": _cast(torch.stack([p["down_proj"] for p in parts]), dtype)}


def _mixtral_layer(plan: Plan, layer: int) -> dict[str, torch.Tensor]:
    parts = [{p: _noised(ck.read(_mlp_name(layer, p)), e, p == "down_proj") for p in ("gate_proj", "down_proj",
                                                                                       "up_proj")}
             for e, ck in zip(plan.cfg.experts, plan.experts)]  # mergekit's noise draw order
    return _fused(f"model.layers.{layer}.mlp", parts, plan.out_dtype)


def _qwen_layer(plan: Plan, layer: int) -> dict[str, torch.Tensor]:
    """The experts fused as for Mixtral (mergekit writes them one tensor per projection, which transformers fuses
    the same way on load) and the shared expert as a dense MLP."""
    sources = list(zip(plan.cfg.experts, plan.experts)) + [(plan.cfg.shared_experts[0], plan.shared[0])]
    parts: list[dict[str, torch.Tensor]] = [{} for _ in sources]
    for proj in QWEN_MLP_ORDER:  # mergekit's noise draw order: per projection, every expert then the shared one
        for part, (e, ck) in zip(parts, sources):
            part[proj] = _noised(ck.read(_mlp_name(layer, proj)), e, proj == "down_proj")
    pre = f"model.layers.{layer}.mlp"
    out = _fused(pre, parts[:-1], plan.out_dtype)
    out.update({f"{pre}.shared_expert.{p}.weight": _cast(parts[-1][p], plan.out_dtype) for p in MLP})
    return out


def _layer_entries(plan: Plan, layer: int) -> list[tuple[str, tuple, torch.dtype]]:
    info = {p: plan.experts[0].info(_mlp_name(layer, p)) for p in MLP}
    dtype = plan.out_dtype or info["gate_proj"].torch_dtype
    inter, hidden = info["gate_proj"].shape
    pre = f"model.layers.{layer}.mlp"
    n = len(plan.experts)
    entries = [(f"{pre}.experts.gate_up_proj", (n, 2 * inter, hidden), dtype),
               (f"{pre}.experts.down_proj", (n, hidden, inter), dtype)]
    if plan.arch != "Mixtral":
        entries += [(f"{pre}.shared_expert.{p}.weight", tuple(info[p].shape), dtype) for p in MLP]
    return entries


def _router_tensors(plan: Plan, gates: torch.Tensor, layer: int) -> dict[str, torch.Tensor]:
    pre = f"model.layers.{layer}.mlp"
    n = len(plan.experts)
    out = {f"{pre}.gate.weight": _cast(gates[layer, :n], plan.out_dtype).contiguous()}
    if plan.arch != "Mixtral":
        out[f"{pre}.shared_expert_gate.weight"] = _cast(gates[layer, n:], plan.out_dtype).contiguous()
    return out


def _base_tensor(plan: Plan, name: str, shape: tuple, dtype: torch.dtype) -> torch.Tensor:
    if name in plan.base:
        return _cast(plan.base.read(name), plan.out_dtype)
    return torch.zeros(shape, dtype=dtype)  # Qwen2-MoE wants q/k/v biases: a Llama base has none


def write_moe(plan: Plan, gates: torch.Tensor, folder: Path, shard: int, progress: ProgressFn | None) -> int:
    """Stream the MoE's tensors into ``folder``; returns the tensor count."""
    routers = [_router_tensors(plan, gates, layer) for layer in range(plan.layers)]
    base_entries = _attention_entries(plan)
    entries = base_entries + [e for layer in range(plan.layers) for e in _layer_entries(plan, layer)]
    entries += [(n, tuple(t.shape), t.dtype) for r in routers for n, t in r.items()]
    writer = ShardedWriter(folder, [(n, d, s) for n, s, d in entries], shard)
    for name, shape, dtype in track(progress, "base tensors", base_entries):
        writer.write(name, _base_tensor(plan, name, shape, dtype))
    layer_fn = _mixtral_layer if plan.arch == "Mixtral" else _qwen_layer
    for layer in track(progress, "expert layers", range(plan.layers)):
        for name, t in layer_fn(plan, layer).items():
            writer.write(name, t.contiguous())
    for r in routers:
        for name, t in r.items():
            writer.write(name, t)
    writer.close()
    return len(entries)


def _gates(plan: Plan, opts: MoeOptions, device, progress: ProgressFn | None) -> torch.Tensor:
    """Router rows for the experts, then the shared expert's when it has prompts (or the gates are random)."""
    cfg = plan.cfg
    need = list(cfg.experts)
    if cfg.shared_experts and (cfg.shared_experts[0].positive_prompts or cfg.gate_mode in RANDOM_MODES):
        need += cfg.shared_experts
    return gate_vectors(Path(cfg.base_model), need, cfg.gate_mode, layers=plan.layers,
                        hidden=int(plan.base.config["hidden_size"]), hidden_dtype=resolve_dtype(opts.hidden_dtype),
                        device=device, progress=progress)


def _side_files(plan: Plan, folder: Path, opts: MoeOptions) -> None:
    if opts.copy_tokenizer:
        load_prompt_tokenizer(Path(plan.cfg.base_model)).save_pretrained(str(folder))  # padded with BOS, as mergekit
    if opts.model_card:
        write_model_card(folder, stage="moe", method=plan.arch, inputs=list(dict.fromkeys(plan.cfg.models())),
                         parameters={"gate_mode": plan.cfg.gate_mode, "experts": len(plan.cfg.experts),
                                     "experts_per_token": plan.cfg.experts_per_token,
                                     "shared_experts": len(plan.cfg.shared_experts)},
                         recipe=plan.cfg.text, tags=["moe"])


def build_moe(config: str | Path, out: str | Path, opts: MoeOptions | None = None, *, device: str = "auto",
              seed: int = 0, force: bool = False, progress: ProgressFn | None = None, **values) -> dict:
    """Build the MoE that the mergekit-moe YAML at ``config`` describes into ``out``."""
    o = MoeOptions.build(opts, **values)
    plan = plan_moe(load_moe_config(config), str(config), o.allow_all_same)
    shard = parse_size(o.out_shard_size)
    inputs = list(dict.fromkeys(plan.cfg.models()))
    check_output(out, inputs, force)
    dev = resolve_device(device)
    start = time.perf_counter()
    torch.manual_seed(seed)  # random gates and expert noise draw from the global generator, as mergekit's do
    gates = _gates(plan, o, dev, progress)
    with output_folder(out, inputs=inputs, force=force) as tmp:
        count = write_moe(plan, gates, tmp, shard, progress)
        write_config(tmp, plan.out_config)
        _side_files(plan, tmp, o)
    return {"out": str(out), "architecture": plan.arch, "experts": len(plan.cfg.experts),
            "shared_experts": len(plan.cfg.shared_experts), "gate_mode": plan.cfg.gate_mode, "layers": plan.layers,
            "tensors": count, "degenerate_layers": degenerate_layers(gates), "seconds": time.perf_counter() - start}
