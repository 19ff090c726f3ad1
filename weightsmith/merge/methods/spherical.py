"""Interpolation on the sphere: SLERP between a base and one model, NuSLERP between two (or their task
vectors), Multi-SLERP and the Karcher mean of several. SLERP works in float32 and rounds once (its
``reference`` is mergekit's arithmetic); the others follow mergekit 0.1.5's arithmetic and are their own
reference.
"""
from __future__ import annotations

import torch

from ...errors import WeightsmithError
from ..registry import Param, merge_method
from . import reference as ref
from .average import WEIGHT


@merge_method("slerp", title="SLERP", url="https://en.wikipedia.org/wiki/Slerp",
              params=(Param("t", float, 0.5, "global", 0.0, 1.0, help="0 = base, 1 = other model"),),
              base="required", max_models=1, mergekit_ignores=("weight",), reference=ref.slerp)
def slerp(tensors: list[torch.Tensor], base: torch.Tensor, t: float, dot_threshold: float = 0.9995,
          eps: float = 1e-8) -> torch.Tensor:
    """Spherical interpolation from the base (t=0) to the other model (t=1) on the flattened tensors."""
    v0, v1 = base.reshape(-1), tensors[0].reshape(-1)
    if v0.numel() == 0:
        return base.clone()
    n0, n1 = v0.norm(), v1.norm()
    n0 = n0 if n0 > eps else torch.ones_like(n0)
    n1 = n1 if n1 > eps else torch.ones_like(n1)
    dot = ((v0 / n0) * (v1 / n1)).sum().clamp(-1, 1)
    if dot.abs() > dot_threshold:
        return ((1 - t) * v0 + t * v1).reshape(base.shape)
    theta = torch.acos(dot)
    s = torch.sin(theta)
    return (torch.sin((1 - t) * theta) / s * v0 + torch.sin(t * theta) / s * v1).reshape(base.shape)


def _unit_rows(x: torch.Tensor) -> torch.Tensor:
    return x / x.norm(dim=-1, keepdim=True).clamp(min=1e-7)


def nuslerp_pair(t: float, v0: torch.Tensor, v1: torch.Tensor, row_wise: bool = False, flatten: bool = True,
                 eps: float = 1e-8) -> torch.Tensor:
    """SLERP of v0 → v1 at ``t``: over the flattened tensors, or row by row (columns with ``row_wise``);
    (near-)colinear vectors interpolate linearly."""
    shape = v0.shape
    if flatten:
        v0, v1 = v0.reshape(-1), v1.reshape(-1)
    elif row_wise:
        v0, v1 = v0.transpose(0, -1), v1.transpose(0, -1)
    cos = (_unit_rows(v0) * _unit_rows(v1)).sum(dim=-1, keepdim=True).clamp(-1, 1)
    colinear = (1 - cos.square()) <= eps**2
    theta = torch.acos(torch.where(colinear, 0, cos))
    out = (torch.sin((1 - t) * theta) * v0 + torch.sin(t * theta) * v1) / torch.sin(theta)
    out = torch.where(colinear, (1 - t) * v0 + t * v1, out)
    if row_wise and not flatten:
        out = out.transpose(0, -1)
    return out.reshape(shape)


@merge_method("nuslerp", title="NuSLERP", url="https://github.com/arcee-ai/mergekit",
              params=(WEIGHT, Param("nuslerp_row_wise", bool, False, help="SLERP each column instead of each row"),
                      Param("nuslerp_flatten", bool, True, help="SLERP the flattened tensors")),
              base="optional", min_models=2, max_models=2, reference=True)
def nuslerp(tensors: list[torch.Tensor], base: torch.Tensor | None = None, weight: list[float] = (1.0, 1.0),
            nuslerp_row_wise: bool = False, nuslerp_flatten: bool = True) -> torch.Tensor:
    """NuSLERP: SLERP between two models at t = w₂ / (w₁ + w₂) (0.5 when the weights cancel); with a
    base, between the two task vectors, added back to the base."""
    total = weight[0] + weight[1]
    t = 0.5 if abs(total) < 1e-6 else weight[1] / total
    a, b = tensors
    if base is None:
        return nuslerp_pair(t, a, b, nuslerp_row_wise, nuslerp_flatten)
    return base + nuslerp_pair(t, a - base, b - base, nuslerp_row_wise, nuslerp_flatten)


@merge_method("multislerp", title="Multi-SLERP", url="https://goddard.blog/posts/multislerp-wow-what-a-cool-idea",
              params=(WEIGHT, Param("normalize_weights", bool, True, help="weights divided by their sum"),
                      Param("eps", float, 1e-8, "global", 0.0, help="guard against zero norms")),
              base="optional", reference=True)
def multislerp(tensors: list[torch.Tensor], base: torch.Tensor | None = None, weight: list[float] = (),
               normalize_weights: bool = True, eps: float = 1e-8) -> torch.Tensor:
    """Multi-SLERP (Goddard 2025): barycentric interpolation on the hypersphere: the weighted mean of
    the unit vectors, the tangent-space mean mapped back by the exponential map, scaled to the
    weighted mean norm; with a base, of the task vectors."""
    if len(tensors) == 1:
        return tensors[0]
    shape = tensors[0].shape
    pts = torch.stack(tensors)
    if base is not None:
        pts -= base
    flat = pts.view(len(tensors), -1)
    w = torch.tensor(list(weight), dtype=pts.dtype, device=pts.device)
    if normalize_weights:
        w = w / w.sum()
    norms = flat.norm(dim=-1, keepdim=True)
    units = flat / (norms + eps)
    centre = (units * w.view(-1, 1)).sum(0)
    size = centre.norm()
    if size < eps:
        if len(tensors) != 2:
            raise WeightsmithError("multislerp: the weighted sum of the inputs' directions is zero (antipodal inputs "
                                   "with balancing weights); change the weights")
        out = (pts[0] * w[0] + pts[1] * w[1]).view(shape)
        return out + base if base is not None else out
    centre = centre / size
    tangent = ((units - (units * centre).sum(-1, keepdim=True) * centre) * w.view(-1, 1)).sum(0)
    step = tangent.norm() + eps
    out = (centre * torch.cos(step) + tangent * (torch.sin(step) / step)) * (norms.squeeze(-1) * w).sum()
    out = out.view(shape)
    return out + base if base is not None else out


@merge_method("karcher", title="Karcher mean", url="https://en.wikipedia.org/wiki/Fr%C3%A9chet_mean",
              params=(Param("max_iter", int, 10, "global", 1, help="fixed-point iterations at most"),
                      Param("tol", float, 1e-5, "global", 0.0, help="stop when the tangent step is shorter")),
              base="optional", reference=True, notes="a base model counts as one more input", mergekit_ignores=("weight",))
def karcher(tensors: list[torch.Tensor], base: torch.Tensor | None = None, max_iter: int = 10,
            tol: float = 1e-5) -> torch.Tensor:
    """Karcher (Riemannian) mean of the inputs' directions on the unit sphere, by fixed-point iteration,
    scaled by their mean norm. A base model counts as one more input (mergekit ignores its role)."""
    xs = list(tensors) + ([base] if base is not None else [])
    if len(xs) == 1:
        return xs[0]
    alpha = 1.0 / len(xs)
    wide = torch.float64 if xs[0].dtype == torch.float64 else torch.float32
    norms = [torch.linalg.vector_norm(x.to(wide)) for x in xs]
    units = [torch.zeros_like(x) if n.item() == 0.0 else (x / n).to(x.dtype) for x, n in zip(xs, norms)]
    live = [u for u, n in zip(units, norms) if n.item() > tol]
    if not live:
        return torch.zeros_like(xs[0])
    share = _shares(alpha, len(live))
    mean = torch.zeros_like(live[0])
    for s, u in zip(share, live):
        mean += s * u
    size = torch.linalg.vector_norm(mean.to(wide))
    mean = live[0].clone() if size.item() < tol else (mean / size).to(mean.dtype)
    for _ in range(int(max_iter)):
        tangent = torch.zeros_like(mean)
        for s, u in zip(share, live):
            cos = torch.clamp(torch.dot(mean.flatten(), u.flatten()), -1.0, 1.0)
            theta = torch.arccos(cos)
            if theta.item() < tol:
                continue
            tangent += s * (theta / torch.sin(theta)) * (u - cos * mean)
        step = torch.linalg.vector_norm(tangent.to(wide))
        if step.item() < tol:
            break
        mean = (torch.cos(step) * mean + torch.sin(step) * (tangent / step)).to(mean.dtype)
        size = torch.linalg.vector_norm(mean.to(wide))
        if size.item() > tol:
            mean = (mean / size).to(mean.dtype)
    return sum(alpha * n for n in norms) * mean


def _shares(alpha: float, n: int) -> list[float]:
    """Equal shares renormalised over the ``n`` non-degenerate inputs, in mergekit's float arithmetic."""
    total = sum([alpha] * n)
    return [alpha / total] * n


# -- two-model methods -------------------------------------------------------------------------
