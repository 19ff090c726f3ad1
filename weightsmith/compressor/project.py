"""Turning a transformers model into an RPS model: choose modules, lay out memory, fill it.

Filling is either the least-squares projection of trained weights into the memory
(z_j = sum_{i->j} lambda_i g_i W_i / sum_{i->j} lambda_i^2, the mean of the signed, unscaled
weights when the lambdas agree; arXiv 2310.11611) or a fresh init for training from scratch.
"""
from __future__ import annotations

import math
import re
from collections.abc import Iterator, Mapping

import torch
from torch import nn

from ..checkpoint import detect_layout
from ..errors import OptionError
from ..progress import ProgressFn, track
from .hashing import random_fold_slots
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
            raise OptionError(None, f"module {n} shares its weight with a module chosen by {{0}}; choose both "
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
         seed: int, dtype: torch.dtype = torch.float32) -> HashedMemory:
    mods = [(n, "linear" if isinstance(m, nn.Linear) else "embedding", tuple(m.weight.shape),
             isinstance(m, nn.Linear) and m.bias is not None) for n, m in chosen]
    specs = plan_specs(mods, budget, sharing, mapping, tile)
    w = chosen[0][1].weight
    return HashedMemory(specs, mapping=mapping, seed=seed, sharing=sharing, tile=tile, dtype=dtype,
                        device="cpu" if w.is_meta else w.device)


# Slots projected at once: at least this many ranges and at most this many slots per range (three float64
# sums: 192 MB), so the sums stay a small fraction of the memory being filled.
MIN_WINDOWS, MAX_WINDOW_SLOTS = 16, 1 << 23
BLOCK = 1 << 21  # weights hashed at once


def _scales(memory: HashedMemory, weights: Mapping[str, torch.Tensor]) -> float:
    """Set every spec's lambda (see ``project``); returns the sum of squares of all compressed weights."""
    sq = {n: float(weights[n].double().square().sum()) for n in memory.specs}
    total_sq, total_n = sum(sq.values()), sum(s.numel for s in memory.specs.values())
    rms_all = (total_sq / total_n) ** 0.5 or 1.0
    for spec in memory.specs.values():
        rms = (sq[spec.name] / spec.numel) ** 0.5
        spec.scale = 2.0 ** round(math.log2(rms / rms_all)) if rms > 0 else 1.0
    return total_sq


def _windows(memory: HashedMemory) -> list[tuple[int, int]]:
    """Slot ranges projected one after the other. Under STABLE-RPS's global fold the weights feeding a range are
    known without hashing, so ranges stay small; a module's own region is one range; ROAST's tiles can land
    anywhere, so its global memory is one range."""
    if memory.sharing == "module":
        return [(s.base, s.base + s.slots) for s in memory.specs.values()]
    if memory.mapping == "roast":
        return [(0, memory.num_slots)]
    size = min(MAX_WINDOW_SLOTS, max(1, -(-memory.num_slots // MIN_WINDOWS)))
    return [(a, min(a + size, memory.num_slots)) for a in range(0, memory.num_slots, size)]


def _feeding(memory: HashedMemory, a: int, b: int) -> Iterator[tuple[ModuleSpec, int, int]]:
    """(spec, first, last) flat weight ranges of each module that may map into slots [a, b), in index order."""
    specs = list(memory.specs.values())
    if memory.sharing == "module" or memory.mapping == "roast":
        yield from ((s, 0, s.numel) for s in specs if s.base < b and a < s.base + s.slots)
        return
    m, total = memory.num_slots, sum(s.numel for s in specs)
    chunks = -(-total // m)
    shifts = random_fold_slots(memory.seed, torch.arange(chunks) * m, m).tolist()  # chunk c's slot for index c*m
    for c, shift in enumerate(shifts):
        lo = (a - shift) % m
        spans = [(lo, lo + b - a)] if lo + b - a <= m else [(lo, m), (0, lo + b - a - m)]
        for s_lo, s_hi in spans:
            g_lo, g_hi = c * m + s_lo, min(c * m + s_hi, total)
            for spec in specs:
                first, last = max(g_lo, spec.offset) - spec.offset, min(g_hi, spec.offset + spec.numel) - spec.offset
                if first < last:
                    yield spec, first, last


def _slots(memory: HashedMemory, spec: ModuleSpec, lo: int, hi: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Slots and signs of a module's flat weights [lo, hi) (for ROAST, whole rows: it hashes rows of tiles)."""
    cols, dev = spec.shape[1], memory.memory.device
    if memory.mapping == "stable":
        pos = torch.arange(lo, hi, device=dev)
        return memory._positions(spec, pos // cols, pos % cols)
    rows = torch.arange(lo // cols, hi // cols, device=dev).unsqueeze(1)
    slot, sign = memory._positions(spec, rows, torch.arange(cols, device=dev).unsqueeze(0))
    return slot.reshape(-1), sign.reshape(-1)


def _accumulate(memory: HashedMemory, acc: torch.Tensor, a: int, spec: ModuleSpec, w: torch.Tensor, first: int,
                last: int) -> None:
    """Add one module's weights [first, last) to the window's sums: acc = (sum lambda g w, sum lambda^2, sum w^2)."""
    step = BLOCK if memory.mapping == "stable" else max(1, BLOCK // spec.shape[1]) * spec.shape[1]
    for lo in range(first, last, step):
        hi = min(lo + step, last)
        slot, sign = _slots(memory, spec, lo, hi)
        inside = (slot >= a) & (slot < a + acc.shape[1])
        slot, vals = slot[inside] - a, w[lo:hi][inside].to(acc.device, torch.float64)
        acc[0].scatter_add_(0, slot, spec.scale * sign[inside].double() * vals)
        acc[1].scatter_add_(0, slot, torch.full_like(vals, spec.scale ** 2))
        acc[2].scatter_add_(0, slot, vals.square())


@torch.no_grad()
def project(memory: HashedMemory, weights: Mapping[str, torch.Tensor], progress: ProgressFn | None = None) -> dict:
    """Least-squares slot values for ``weights`` (module name -> weight, read when needed, any dtype);
    lambda_k = RMS(W_k) / RMS(all compressed weights).

    That lambda keeps the slots in the model's own weight units (so an optimiser tuned for the
    dense model heals it unchanged) while every module keeps its own scale. It is rounded to a
    power of two so that scaling by it is exact: a slot holding one weight gives it back bit for bit.
    The memory is filled one slot range at a time (float64 sums over that range only), so nothing the
    size of the model is held besides the memory itself; the error follows from the same sums.
    """
    total_sq = _scales(memory, weights)
    err_sq, empty = 0.0, 0
    for a, b in track(progress, "projecting", _windows(memory)):
        acc = torch.zeros(3, b - a, dtype=torch.float64, device=memory.memory.device)
        for spec, first, last in _feeding(memory, a, b):
            _accumulate(memory, acc, a, spec, weights[spec.name].reshape(-1), first, last)
        num, den, sq = acc
        z = torch.where(den > 0, num / den.clamp(min=1e-300), torch.zeros_like(num))
        memory.memory[a:b] = z.to(memory.memory.dtype)
        z = memory.memory[a:b].double()  # the error of what is stored
        err_sq += float((den * z.square() - 2 * z * num + sq).sum())
        empty += int((den == 0).sum())
        del acc, num, den, sq, z
    memory.clear_cache()
    return {"relative_error": (max(err_sq, 0.0) / total_sq) ** 0.5 if total_sq > 0 else 0.0, "empty_slots": empty}


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
