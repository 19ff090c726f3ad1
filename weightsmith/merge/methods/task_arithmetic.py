"""The task-vector family's core and its first method: δᵢ = θᵢ − θ_base, each optionally sparsified, mixed
and added back to the base (``task_vectors``); the Params the family shares; task arithmetic itself.
"""
from __future__ import annotations

from collections.abc import Callable

import torch

from ..native import compat_native
from ..native.mixing import Cutoff, Source, mix
from ..registry import Param, merge_method
from .average import WEIGHT, normalize_param

DENSITY = Param("density", float, 1.0, "model", 0.0, 1.0, help="fraction of each task vector kept")
LAMBDA = Param("lambda", float, 1.0, "global", help="scale of the merged task vector")
TASK_COMPAT = Param("compat", str, "paper", choices=("paper", "mergekit"),
                    help="'mergekit' switches TIES' trim to per tensor, DARE rescale to l1, breadcrumbs to mergekit's "
                         "per-tensor counts, breaks ties in |delta| at a top-k threshold as mergekit's sort does, "
                         "and does the arithmetic in the recipe's dtype")
INT8_MASK = Param("int8_mask", bool, False, arg=None,
                  help="accepted from mergekit recipes; changes nothing (masks are exact either way)")


# the task-vector fast paths reproduce mergekit's float32 arithmetic bit for bit (tests/merge)
TASK_VECTOR = dict(base="required", inplace=True, compat_fast=True)


def task_vectors(tensors: list[torch.Tensor], base: torch.Tensor, weight: list[float],
                 sparsify: Callable[[torch.Tensor, int, bool], torch.Tensor] | None = None,
                 consensus: bool = False, normalize: bool = False, lambda_: float = 1.0,
                 inplace: bool = False, cutoff: Callable[[torch.Tensor, int], Cutoff | None] | None = None) -> torch.Tensor:
    """θ_base + λ · merge(sparsify(δᵢ)) with δᵢ = θᵢ − θ_base, the family behind task arithmetic, TIES, DARE, breadcrumbs.

    ``sparsify(δᵢ, i, own)`` returns the sparsified delta; ``cutoff(θᵢ, i)`` instead returns a magnitude
    cutoff applied while mixing (or None to fall back to ``sparsify``), so no trimmed copy is made.
    ``consensus`` applies TIES sign election (sign of Σ wᵢδᵢ, zero elects +) and the disjoint mean;
    ``normalize`` divides by the summed weights of the contributing entries (all inputs without
    consensus). With ``inplace`` the inputs' storage is reused for the deltas and the result (the
    engine hands over tensors it owns), so a merge of N models holds N+1 copies of a tensor.
    """
    def source(i: int) -> Source:
        x = tensors[i]
        cut = cutoff(x, i) if cutoff else None
        if cut is not None:
            return Source(x.reshape(-1), False, cut)
        d = x.sub_(base) if inplace else x - base
        return Source((sparsify(d, i, True) if sparsify else d).reshape(-1), True)

    sources = [source(i) for i in range(len(tensors))]
    out = base if inplace else torch.empty_like(base)
    mix(sources, base.reshape(-1), out.reshape(-1), weight, consensus, normalize, lambda_)
    return out


@merge_method("task_arithmetic", title="Task Arithmetic", url="https://arxiv.org/abs/2212.04089",
              params=(WEIGHT, normalize_param(False), LAMBDA, INT8_MASK), reference=compat_native.task_arithmetic,
              **TASK_VECTOR)
def task_arithmetic(tensors, base, weight, normalize=False, lambda_=1.0, inplace=False):
    """Task arithmetic (Ilharco et al. 2023): θ_base + λ Σ wᵢ δᵢ."""
    return task_vectors(tensors, base, weight, normalize=normalize, lambda_=lambda_, inplace=inplace)
