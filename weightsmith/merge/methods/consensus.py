"""Entry-wise agreement of task vectors: SCE (Wan et al. 2024) selects entries by their variance across the
task vectors and weighs each vector by its energy; RAM and RAM+ (https://arxiv.org/abs/2601.13572) keep an
entry only one model changed in full and average those several changed. Parameters and defaults are
mergekit 0.1.5's; its arithmetic details are kept, so float32 results match it bit for bit.
"""
from __future__ import annotations

import torch

from ..registry import Param, merge_method
from .task_arithmetic import INT8_MASK


@merge_method("sce", title="SCE", url="https://arxiv.org/abs/2408.07990",
              params=(Param("select_topk", float, 1.0, "global", 0.0, 1.0,
                            help="fraction of entries kept, by variance across the task vectors"), INT8_MASK),
              base="required", reference=True, mergekit_ignores=("weight",))
def sce(tensors: list[torch.Tensor], base: torch.Tensor, select_topk: float = 1.0) -> torch.Tensor:
    """Select the top ``select_topk`` fraction of entries by variance across the task vectors,
    Calculate each vector's weight from its mean squared delta, Erase entries against the elected sign."""
    deltas = torch.stack([x - base for x in tensors])
    if select_topk < 1:
        var = deltas.var(dim=0, unbiased=False)
        k = int(torch.count_nonzero(var) * select_topk) if select_topk > 0 else 0
        chosen = torch.zeros_like(var)
        if k > 0:
            chosen.view(-1)[var.abs().view(-1).topk(k).indices] = 1
        deltas = deltas * chosen.unsqueeze(0)
    elected = (deltas.sum(dim=0) >= 0).to(deltas.dtype) * 2 - 1
    agree = deltas.sign() == elected
    energy = deltas.square().reshape(len(tensors), -1).mean(dim=1)
    total = energy.sum().item()
    w = torch.ones_like(energy) / len(tensors) if abs(total) < 1e-6 else energy / total
    w = (w.reshape(-1, *[1] * base.dim()) * agree)
    return base + (deltas * w).sum(dim=0) / w.sum(dim=0).clamp(min=1e-6)


# -- SLERP variants ----------------------------------------------------------------------------


def _ram_terms(tensors: list[torch.Tensor], base: torch.Tensor, epsilon: float):
    deltas = torch.stack([x - base for x in tensors]).view(len(tensors), -1)
    active = deltas.abs() > epsilon
    count = active.sum(dim=0, keepdim=True)
    return deltas * active, active, count, count > 1, count == 1


@merge_method("ram", title="RAM", url="https://arxiv.org/abs/2601.13572",
              params=(Param("epsilon", float, 1e-5, "global", 0.0, help="|delta| above which an entry counts as changed"),),
              base="required", reference=True, mergekit_ignores=("weight",))
def ram(tensors: list[torch.Tensor], base: torch.Tensor, epsilon: float = 1e-5) -> torch.Tensor:
    """RAM: an entry changed (|δ| > ε) by one model only keeps that model's delta in full; entries
    changed by several get the mean of their deltas."""
    d, _, count, shared, own = _ram_terms(tensors, base, epsilon)
    merged = (d * own + d * shared / count.clamp(min=1)).sum(dim=0, keepdim=True)
    return base + merged.reshape_as(base)


@merge_method("ramplus_tl", title="RAM+ (tensor-local)", url="https://arxiv.org/abs/2601.13572",
              params=(Param("r", float, 0.1, "global", 0.0, help="boost of unique entries per unit of overlap"),
                      Param("alpha", float, 0.2, "global", 0.0, help="cap on the overlap ratio"),
                      Param("epsilon", float, 1e-5, "global", 0.0, help="|delta| above which an entry counts as changed")),
              base="required", reference=True, mergekit_ignores=("weight",))
def ramplus_tl(tensors: list[torch.Tensor], base: torch.Tensor, r: float = 0.1, alpha: float = 0.2,
               epsilon: float = 1e-5) -> torch.Tensor:
    """RAM+ (tensor-local): as RAM, with each model's unique entries scaled by 1 + r·min(ρ, α), ρ its
    shared-to-unique ratio of changed entries in this tensor."""
    d, active, count, shared, own = _ram_terms(tensors, base, epsilon)
    rho = (active & shared).sum(dim=1) / (active & own).sum(dim=1).clamp(min=epsilon)
    boost = 1 + r * rho.clamp(min=0, max=alpha)
    merged = (d * own * boost.unsqueeze(-1) + d * shared / count.clamp(min=1)).sum(dim=0, keepdim=True)
    return base + merged.reshape_as(base)
