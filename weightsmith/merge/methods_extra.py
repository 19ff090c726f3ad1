"""The merge methods mergekit 0.1.5 registers beyond the task-vector family in ``methods.py``: DELLA,
SCE, NuSLERP, Multi-SLERP, the Karcher mean, NearSwap, Arcee Fusion, RAM and RAM+ (tensor-local).

Pure functions on one tensor name's inputs (float32, or the recipe's dtype), as the engine feeds them;
parameters and defaults are mergekit 0.1.5's. ``tensors`` never includes the base; methods whose
base is optional take ``base=None``. Each formula follows the paper or post named in its docstring;
where mergekit fixes an arithmetic detail (an epsilon, the order of a sum) it is kept so that float32
results match mergekit bit for bit (tests/merge/test_methods_extra.py).
"""
from __future__ import annotations

import torch

from ..errors import WeightsmithError
from . import reference as ref
from .methods import DENSITY, INT8_MASK, LAMBDA, WEIGHT, normalize_param, task_vectors
from .registry import Param, PlanCheck, merge_method
from .sparsify import l1_rescaled


# -- DELLA (Deep et al. 2024, https://arxiv.org/abs/2406.11617) ---------------------------------

def della_keep_probabilities(delta: torch.Tensor, density: float, epsilon: float) -> torch.Tensor:
    """MAGPRUNE's keep probability of each entry: density − ε for the smallest |δ| of its row rising
    linearly with the magnitude rank to density + ε for the largest (1-D tensors are one row)."""
    rows = delta.reshape(1, -1) if delta.dim() < 2 else delta
    ranks = torch.empty_like(rows, dtype=torch.float32)
    order = rows.abs().argsort(dim=-1)
    ranks.scatter_(-1, order, torch.arange(rows.shape[-1], dtype=torch.float32).expand_as(rows).contiguous())
    span = max(rows.shape[-1] - 1, 1)
    return ((density - epsilon) + (ranks / span).clamp(0, 1) * (2 * epsilon)).reshape(delta.shape)


def della_drop(delta: torch.Tensor, density: float, epsilon: float, rescale: str,
               generator: torch.Generator | None = None) -> torch.Tensor:
    """Drop each entry of δ with probability 1 − p (``della_keep_probabilities``); survivors rescaled
    to the dropped delta's L1 norm with ``rescale: l1`` (mergekit's rescale)."""
    if density >= 1:
        return delta
    if density <= 0:
        return torch.zeros_like(delta)
    probs = della_keep_probabilities(delta, density, epsilon)
    keep = torch.rand(delta.shape, generator=generator, device=generator.device if generator else delta.device)
    kept = delta * (keep.to(delta.device) < probs.to(delta.device))
    return l1_rescaled(delta, kept) if rescale == "l1" else kept


def della_check(densities: list[float], epsilons: list[float], where: str) -> None:
    """density ± epsilon must lie inside (0, 1) wherever density < 1 (mergekit raises on it too)."""
    for d, e in zip(densities, epsilons):
        if 0 < d < 1 and (d + e >= 1 or d - e <= 0):
            raise WeightsmithError(f"{where}: DELLA needs density ± epsilon inside (0, 1); got density {d:g}, "
                                   f"epsilon {e:g} (lower epsilon below {min(d, 1 - d):g})")


def _della(consensus: bool):
    def della(tensors, base, weight, density, epsilon, normalize=consensus, lambda_=1.0, rescale="l1",
              generators=None):
        gens = generators or [None] * len(tensors)
        return task_vectors(tensors, base, weight,
                            lambda d, i, own: della_drop(d, density[i], epsilon[i], rescale, gens[i]),
                            consensus=consensus, normalize=normalize, lambda_=lambda_)
    della.__doc__ = ("DELLA: MAGPRUNE drops each δ entry with a probability falling with its magnitude rank; "
                     f"then {'TIES sign election and disjoint mean' if consensus else 'task arithmetic'}.")
    return della


della = _della(True)
della_linear = _della(False)


# -- SCE (Wan et al. 2024, FuseChat, https://arxiv.org/abs/2408.07990) ---------------------------

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

def _ram_terms(tensors: list[torch.Tensor], base: torch.Tensor, epsilon: float):
    deltas = torch.stack([x - base for x in tensors]).view(len(tensors), -1)
    active = deltas.abs() > epsilon
    count = active.sum(dim=0, keepdim=True)
    return deltas * active, active, count, count > 1, count == 1


def ram(tensors: list[torch.Tensor], base: torch.Tensor, epsilon: float = 1e-5) -> torch.Tensor:
    """RAM: an entry changed (|δ| > ε) by one model only keeps that model's delta in full; entries
    changed by several get the mean of their deltas."""
    d, _, count, shared, own = _ram_terms(tensors, base, epsilon)
    merged = (d * own + d * shared / count.clamp(min=1)).sum(dim=0, keepdim=True)
    return base + merged.reshape_as(base)


def ramplus_tl(tensors: list[torch.Tensor], base: torch.Tensor, r: float = 0.1, alpha: float = 0.2,
               epsilon: float = 1e-5) -> torch.Tensor:
    """RAM+ (tensor-local): as RAM, with each model's unique entries scaled by 1 + r·min(ρ, α), ρ its
    shared-to-unique ratio of changed entries in this tensor."""
    d, active, count, shared, own = _ram_terms(tensors, base, epsilon)
    rho = (active & shared).sum(dim=1) / (active & own).sum(dim=1).clamp(min=epsilon)
    boost = 1 + r * rho.clamp(min=0, max=alpha)
    merged = (d * own * boost.unsqueeze(-1) + d * shared / count.clamp(min=1)).sum(dim=0, keepdim=True)
    return base + merged.reshape_as(base)


def passthrough(tensors: list[torch.Tensor], scale: list[float | None] = (None,)) -> torch.Tensor:
    """The one input unchanged, or multiplied by its ``scale`` (layer stacking, pruning by filters)."""
    return tensors[0] if scale[0] is None else tensors[0] * scale[0]


# -- declarations ------------------------------------------------------------------------------

def della_reference(consensus: bool):
    """DELLA as mergekit computes it in a half-precision dtype: the drop in that dtype (float32 for
    float16 on CPU), then mergekit's task-vector arithmetic (``reference.task_merge``)."""
    def della_mk(tensors, base, weight, density, epsilon, normalize=consensus, lambda_=1.0, rescale="l1",
                 generators=None, **_):
        gens = generators or [None] * len(tensors)

        def drop(d: torch.Tensor, i: int) -> torch.Tensor:
            work = d.dtype if (d.device.type != "cpu" or d.dtype == torch.bfloat16) else torch.float32
            return della_drop(d.to(work), density[i], epsilon[i], rescale, gens[i]).to(d.dtype)
        return ref.task_merge(tensors, base, weight, drop, consensus, normalize, lambda_)
    return della_mk


def _della_valid(check: PlanCheck) -> None:
    for name, kw in check.tensors:
        della_check(kw["density"], kw["epsilon"], f"{check.where}: {name}")


def _rescale(default: str) -> Param:
    return Param("rescale", str, default, choices=("l1", "none"),
                 help="rescale kept deltas to the dropped delta's L1 norm (true/false as in mergekit)")


_EPSILON = Param("epsilon", float, 0.15, "model", 0.0, 1.0, help="keep probabilities span density ± epsilon")
_IGNORES_WEIGHT = dict(mergekit_ignores=("weight",))
for _name, _consensus, _title in (("della", True, "DELLA"), ("della_linear", False, "DELLA (linear)")):
    merge_method(_name, title=_title, url="https://arxiv.org/abs/2406.11617",
                 params=(WEIGHT, DENSITY, _EPSILON, normalize_param(_consensus), LAMBDA, _rescale("l1"), INT8_MASK),
                 base="required", random=True, validate=_della_valid, reference=della_reference(_consensus),
                 )(della if _consensus else della_linear)
del _name, _consensus, _title

merge_method("sce", title="SCE", url="https://arxiv.org/abs/2408.07990",
             params=(Param("select_topk", float, 1.0, "global", 0.0, 1.0,
                           help="fraction of entries kept, by variance across the task vectors"), INT8_MASK),
             base="required", reference=sce, **_IGNORES_WEIGHT)(sce)
merge_method("nuslerp", title="NuSLERP", url="https://github.com/arcee-ai/mergekit",
             params=(WEIGHT, Param("nuslerp_row_wise", bool, False, help="SLERP each column instead of each row"),
                     Param("nuslerp_flatten", bool, True, help="SLERP the flattened tensors")),
             base="optional", min_models=2, max_models=2, reference=nuslerp)(nuslerp)
merge_method("multislerp", title="Multi-SLERP", url="https://goddard.blog/posts/multislerp-wow-what-a-cool-idea",
             params=(WEIGHT, Param("normalize_weights", bool, True, help="weights divided by their sum"),
                     Param("eps", float, 1e-8, "global", 0.0, help="guard against zero norms")),
             base="optional", reference=multislerp)(multislerp)
merge_method("karcher", title="Karcher mean", url="https://en.wikipedia.org/wiki/Fr%C3%A9chet_mean",
             params=(Param("max_iter", int, 10, "global", 1, help="fixed-point iterations at most"),
                     Param("tol", float, 1e-5, "global", 0.0, help="stop when the tangent step is shorter")),
             base="optional", reference=karcher, notes="a base model counts as one more input",
             **_IGNORES_WEIGHT)(karcher)
merge_method("nearswap", title="NearSwap", url="https://huggingface.co/alchemonaut/QuartetAnemoi-70B-t0.0001",
             params=(Param("t", float, None, "global", 0.0, required=True,
                           help="distance within which the other model's value is taken"),),
             base="required", max_models=1, reference=nearswap, **_IGNORES_WEIGHT)(nearswap)
merge_method("arcee_fusion", title="Arcee Fusion", url="https://arcee.ai", base="required", max_models=1,
             reference=arcee_fusion, **_IGNORES_WEIGHT)(arcee_fusion)
merge_method("ram", title="RAM", url="https://arxiv.org/abs/2601.13572",
             params=(Param("epsilon", float, 1e-5, "global", 0.0, help="|delta| above which an entry counts as changed"),),
             base="required", reference=ram, **_IGNORES_WEIGHT)(ram)
merge_method("ramplus_tl", title="RAM+ (tensor-local)", url="https://arxiv.org/abs/2601.13572",
             params=(Param("r", float, 0.1, "global", 0.0, help="boost of unique entries per unit of overlap"),
                     Param("alpha", float, 0.2, "global", 0.0, help="cap on the overlap ratio"),
                     Param("epsilon", float, 1e-5, "global", 0.0, help="|delta| above which an entry counts as changed")),
             base="required", reference=ramplus_tl, **_IGNORES_WEIGHT)(ramplus_tl)
merge_method("passthrough", title="Passthrough", url="https://github.com/arcee-ai/mergekit",
             params=(Param("scale", float, None, "model", help="multiply the tensor (filters select which)"),),
             max_models=1, reference=passthrough, notes="copies its one input; with 'slices' stacks layers")(passthrough)
