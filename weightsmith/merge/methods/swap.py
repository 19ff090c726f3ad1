"""Two-model methods that take the other model's values where they meet a test against the base: NearSwap
(within a distance) and Arcee Fusion (where a change is an importance outlier). Their arithmetic is
mergekit 0.1.5's, so each is its own reference.
"""
from __future__ import annotations

import torch

from ..registry import Param, merge_method


@merge_method("nearswap", title="NearSwap", url="https://huggingface.co/alchemonaut/QuartetAnemoi-70B-t0.0001",
              params=(Param("t", float, None, "global", 0.0, required=True,
                            help="distance within which the other model's value is taken"),),
              base="required", max_models=1, reference=True, mergekit_ignores=("weight",))
def nearswap(tensors: list[torch.Tensor], base: torch.Tensor, t: float) -> torch.Tensor:
    """NearSwap: take the other model's value where it lies within ``t`` of the base's, moving only
    t / |a − b| of the way where it lies farther."""
    other = tensors[0]
    w = (t / (base - other).abs().clamp(min=1e-6)).clamp(min=0, max=1)
    return w * other + (1 - w) * base


def quantile_at(x: torch.Tensor, q: float) -> torch.Tensor:
    """The entry at position ⌊q·(n−1)⌋ of the sorted values (no interpolation)."""
    flat = x.reshape(-1)
    return flat.kthvalue(int(q * (flat.numel() - 1)) + 1).values


@merge_method("arcee_fusion", title="Arcee Fusion", url="https://arcee.ai", base="required", max_models=1,
              reference=True, mergekit_ignores=("weight",))
def arcee_fusion(tensors: list[torch.Tensor], base: torch.Tensor) -> torch.Tensor:
    """Arcee Fusion: importance = |θ − θ_base| · KL(softmax θ ‖ softmax θ_base) per row; the base takes
    the other model's values where importance reaches median + 1.5·IQR (a Tukey outlier fence).
    Quantiles are exact (mergekit samples 10⁶ entries of larger tensors)."""
    other = tensors[0]
    p = torch.softmax(other, dim=-1) + 1e-8
    q = torch.softmax(base, dim=-1) + 1e-8
    importance = (other - base).abs() * (p * torch.log(p / q)).sum(dim=-1, keepdim=True)
    q1, mid, q3 = (quantile_at(importance, f) for f in (0.25, 0.5, 0.75))
    fence = mid + 1.5 * (q3 - q1)
    return base + (other - base) * (importance >= fence).float()


# -- RAM (https://arxiv.org/abs/2601.13572) ----------------------------------------------------
