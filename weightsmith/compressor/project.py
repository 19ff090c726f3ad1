"""Turning a transformers model into an RPS model: choose modules, lay out memory, fill it.

Filling is either the least-squares projection of trained weights into the memory
(z_j = sum_{i->j} lambda_i g_i W_i / sum_{i->j} lambda_i^2, the mean of the signed, unscaled
weights when the lambdas agree; arXiv 2310.11611) or a fresh init for training from scratch.
"""
from __future__ import annotations

import math
import re

import torch
from torch import nn

from ..checkpoint import detect_layout
from ..errors import OptionError, literal
from ..progress import ProgressFn, track
from .memory import HashedMemory, ModuleSpec, RPSEmbedding, RPSLinear, plan_specs

DEFAULT_MODULES_HELP = "every nn.Linear inside the transformer blocks (not embeddings, lm_head or norms)"


def default_pattern(model: nn.Module) -> str:
    names = [n for n, _ in model.named_parameters()]
    layout = detect_layout(model.config.to_dict(), names)
    return "^" + re.escape(layout.block_prefix) + r"\d+\."


def select_modules(model: nn.Module, pattern: str | None) -> list[tuple[str, nn.Module]]:
    """Modules to compress: nn.Linear (and nn.Embedding when a pattern is given) whose name matches."""
    kinds = (nn.Linear,) if pattern is None else (nn.Linear, nn.Embedding)
    pat = pattern or default_pattern(model)
    try:
        rx = re.compile(pat)
    except re.error as exc:
        raise OptionError("modules", f"{pat!r} is not a valid regular expression: {exc}") from None
    chosen = [(n, m) for n, m in model.named_modules() if isinstance(m, kinds) and rx.search(n)]
    if not chosen:
        examples = [n for n, m in model.named_modules() if isinstance(m, (nn.Linear, nn.Embedding))][:4]
        raise OptionError("modules", f"{pat!r} matches no nn.Linear/nn.Embedding; module names look like "
                                     f"{', '.join(examples)}")
    tied = {id(p) for n, m in chosen for p in m.parameters(recurse=False)}
    for n, m in model.named_modules():
        if (n, m) not in chosen and any(id(p) in tied for p in m.parameters(recurse=False)):
            raise OptionError(None, f"module {literal(n)} shares its weight with a module chosen by {{0}}; choose both "
                                    f"or neither (untie the embeddings first)", ("modules",))
    return chosen


def _set_module(model: nn.Module, name: str, new: nn.Module) -> None:
    parent, _, leaf = name.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, leaf, new)


def attach(model: nn.Module, memory: HashedMemory, sources: dict[str, nn.Module] | None = None) -> nn.Module:
    """Swap every module named in the memory's specs for its RPS version; the model owns the memory as ``rps``."""
    model.rps = memory
    for spec in memory.specs.values():
        old = (sources or {}).get(spec.name) or model.get_submodule(spec.name)
        if spec.kind == "linear":
            bias = old.bias.detach().clone() if spec.bias and old.bias is not None else None
            if spec.bias and bias is None:
                bias = torch.zeros(spec.shape[0], device=memory.memory.device, dtype=memory.memory.dtype)
            new = RPSLinear(memory, spec, bias)
        else:
            new = RPSEmbedding(memory, spec, getattr(old, "padding_idx", None))
        _set_module(model, spec.name, new)
    return model


def plan(chosen: list[tuple[str, nn.Module]], *, budget: float, mapping: str, sharing: str, tile: int,
         seed: int) -> HashedMemory:
    mods = [(n, "linear" if isinstance(m, nn.Linear) else "embedding", tuple(m.weight.shape),
             isinstance(m, nn.Linear) and m.bias is not None) for n, m in chosen]
    specs = plan_specs(mods, budget, sharing, mapping, tile)
    w = chosen[0][1].weight
    return HashedMemory(specs, mapping=mapping, seed=seed, sharing=sharing, tile=tile,
                        dtype=torch.float32, device=w.device)


@torch.no_grad()
def project(memory: HashedMemory, weights: dict[str, torch.Tensor], progress: ProgressFn | None = None) -> dict:
    """Least-squares slot values for ``weights``; lambda_k = RMS(W_k) / RMS(all compressed weights).

    That lambda keeps the slots in the model's own weight units (so an optimiser tuned for the
    dense model heals it unchanged) while every module keeps its own scale. It is rounded to a
    power of two so that scaling by it is exact: a slot holding one weight gives it back bit for bit.
    """
    total_sq = sum(float(w.double().square().sum()) for w in weights.values())
    total_n = sum(w.numel() for w in weights.values())
    rms_all = (total_sq / total_n) ** 0.5 or 1.0
    for spec in memory.specs.values():
        rms = float(weights[spec.name].double().square().mean().sqrt())
        spec.scale = 2.0 ** round(math.log2(rms / rms_all)) if rms > 0 else 1.0
    num = torch.zeros(memory.num_slots, dtype=torch.float64, device=memory.memory.device)
    den = torch.zeros_like(num)
    for spec in track(progress, "projecting", list(memory.specs.values())):
        slot, sign = memory.index(spec)
        w = weights[spec.name].to(num.device, torch.float64).reshape(-1)
        num.scatter_add_(0, slot.long(), spec.scale * sign.double() * w)
        den.scatter_add_(0, slot.long(), torch.full_like(w, spec.scale ** 2))
    z = torch.where(den > 0, num / den.clamp(min=1e-300), torch.zeros_like(num))
    memory.memory.copy_(z.to(memory.memory.dtype))
    memory.clear_cache()
    err_sq = 0.0
    for spec in memory.specs.values():
        err_sq += float((memory.weight(spec).double() - weights[spec.name].to(num.device).double()).square().sum())
    return {"relative_error": (err_sq / total_sq) ** 0.5 if total_sq > 0 else 0.0,
            "empty_slots": int((den == 0).sum())}


def compress_model(model: nn.Module, *, budget: float, mapping: str = "stable", pattern: str | None = None,
                   sharing: str = "global", tile: int = 64, seed: int = 0,
                   progress: ProgressFn | None = None) -> tuple[HashedMemory, dict]:
    """Project a trained model's chosen modules into hashed memory, in place."""
    chosen = select_modules(model, pattern)
    memory = plan(chosen, budget=budget, mapping=mapping, sharing=sharing, tile=tile, seed=seed)
    weights = {n: m.weight.detach() for n, m in chosen}
    stats = project(memory, weights, progress)
    attach(model, memory, dict(chosen))
    return memory, stats


@torch.no_grad()
def init_model(model: nn.Module, *, budget: float, mapping: str = "stable", pattern: str | None = None,
               sharing: str = "global", tile: int = 64, seed: int = 0, std: float | None = None) -> HashedMemory:
    """Replace the chosen modules by RPS modules with fresh memory (lambda = 1, z ~ N(0, std))."""
    chosen = select_modules(model, pattern)
    memory = plan(chosen, budget=budget, mapping=mapping, sharing=sharing, tile=tile, seed=seed)
    std = std if std is not None else getattr(model.config, "initializer_range", 0.02)
    gen = torch.Generator().manual_seed(seed)
    memory.memory.copy_(torch.randn(memory.num_slots, generator=gen) * std)
    attach(model, memory, dict(chosen))
    return memory


def spec_weights(memory: HashedMemory) -> dict[str, ModuleSpec]:
    return {f"{s.name}.weight": s for s in memory.specs.values()}
