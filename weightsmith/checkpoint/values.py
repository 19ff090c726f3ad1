"""Value scans shared by the writer's publish check and merge's value checks: one ``torch.aminmax`` pass per
tensor tells whether it is finite (NaN propagates into it, an inf shows as a bound) and all zeros ([0, 0])."""
from __future__ import annotations

import math

import torch


def span(t: torch.Tensor) -> tuple[float, float] | None:
    """(min, max) of a tensor, None when it is empty."""
    if t.numel() == 0:
        return None
    lo, hi = torch.aminmax(t)
    return float(lo), float(hi)


def finite(t: torch.Tensor, bounds: tuple[float, float] | None = ...) -> bool:
    """Whether a tensor holds no NaN/inf (integers always do); ``bounds``: its ``span`` when already known."""
    if not t.is_floating_point():
        return True
    bounds = span(t) if bounds is ... else bounds
    return bounds is None or (math.isfinite(bounds[0]) and math.isfinite(bounds[1]))


def nonfinite_count(t: torch.Tensor) -> int:
    return int((~torch.isfinite(t)).sum()) if t.is_floating_point() else 0
