"""Weighted averages of the inputs: linear (a uniform soup when the weights are equal), Model Stock (the
average pulled toward the base by the inputs' angle), and passthrough (one input, scaled), the method of
layer stacking.
"""
from __future__ import annotations

import torch

from ..registry import Param, merge_method
from . import reference as ref

WEIGHT = Param("weight", float, 1.0, "model", help="per-model weight")


def normalize_param(default: bool) -> Param:
    return Param("normalize", bool, default, help="divide by the summed weights")


@merge_method("linear", title="Linear / uniform soup", url="https://arxiv.org/abs/2203.05482",
              params=(WEIGHT, normalize_param(True)), reference=ref.linear)
def linear(tensors: list[torch.Tensor], weight: list[float], normalize: bool = True) -> torch.Tensor:
    """Weighted average (uniform soup when all weights are equal)."""
    out = torch.zeros_like(tensors[0])
    for x, w in zip(tensors, weight):
        out.add_(x, alpha=w)
    if normalize:
        total = sum(weight)
        out /= total if total != 0 else 1.0
    return out


@merge_method("model_stock", title="Model Stock", url="https://arxiv.org/abs/2403.19522",
              params=(Param("filter_wise", bool, False, help="one ratio per output row"),), base="required",
              min_models=2, reference=True, mergekit_ignores=("weight",))
def model_stock(tensors: list[torch.Tensor], base: torch.Tensor, filter_wise: bool = False) -> torch.Tensor:
    """Model Stock: t = N·cosθ / (1 + (N−1)·cosθ), θ = t·mean(θᵢ) + (1−t)·θ_base; per row when filter_wise.

    Its arithmetic is mergekit's, in the inputs' dtype, so it is its own reference."""
    shape = base.shape
    if filter_wise:
        w0 = base.unsqueeze(0) if base.dim() == 1 else base
        ws = [x.reshape(w0.shape) for x in tensors]
    else:
        w0, ws = base.reshape(-1), [x.reshape(-1) for x in tensors]
    offsets = [x - w0 for x in ws]
    cosines = []
    for i, a in enumerate(offsets):
        for b in offsets[i + 1:]:
            norms = a.norm(dim=-1) * b.norm(dim=-1)
            cosines.append(((a * b).sum(dim=-1) / norms.clamp(min=1e-6)).clamp(-1, 1))
    cos = torch.stack(cosines).mean(dim=0).unsqueeze(-1)
    n = len(ws)
    denom = 1 + (n - 1) * cos
    singular = denom.abs() < 1e-6
    t = torch.where(singular, torch.zeros_like(cos), n * cos / torch.where(singular, torch.ones_like(denom), denom))
    return (t * (sum(ws) / n) + (1 - t) * w0).reshape(shape)


@merge_method("passthrough", title="Passthrough", url="https://github.com/arcee-ai/mergekit",
              params=(Param("scale", float, None, "model", help="multiply the tensor (filters select which)"),),
              max_models=1, reference=True, notes="copies its one input; with 'slices' stacks layers")
def passthrough(tensors: list[torch.Tensor], scale: list[float | None] = (None,)) -> torch.Tensor:
    """The one input unchanged, or multiplied by its ``scale`` (layer stacking, pruning by filters)."""
    return tensors[0] if scale[0] is None else tensors[0] * scale[0]


# -- declarations ------------------------------------------------------------------------------
