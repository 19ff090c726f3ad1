"""Merge methods as pure functions on tensors, registered under their mergekit YAML names.

Each function takes the inputs' tensors for one tensor name (plus the base's where the method
needs one) and the resolved parameters, and returns the merged tensor in float32. Formulas follow
the papers named in ``REGISTRY`` (soups, task arithmetic, TIES, DARE, Model Breadcrumbs, SLERP,
Model Stock); where mergekit chose differently, ``compat: mergekit`` selects its behaviour.
"""
from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from ..errors import WeightsmithError
from .mixing import Cutoff, Source, mix
from .sparsify import breadcrumbs_mask, dare_drop, l1_rescaled, ties_cutoff, ties_fused, ties_trim


def linear(tensors: list[torch.Tensor], weight: list[float], normalize: bool = True) -> torch.Tensor:
    """Weighted average (uniform soup when all weights are equal)."""
    out = torch.zeros_like(tensors[0])
    for x, w in zip(tensors, weight):
        out.add_(x, alpha=w)
    if normalize:
        total = sum(weight)
        out /= total if total != 0 else 1.0
    return out


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


def task_arithmetic(tensors, base, weight, normalize=False, lambda_=1.0, inplace=False):
    """Task arithmetic (Ilharco et al. 2023): θ_base + λ Σ wᵢ δᵢ."""
    return task_vectors(tensors, base, weight, normalize=normalize, lambda_=lambda_, inplace=inplace)


def ties(tensors, base, weight, density, normalize=True, lambda_=1.0, rescale=None, compat=None, inplace=False,
         threshold=None):
    """TIES: trim each δᵢ to its top-density |δ|, elect signs, disjoint mean.

    The trim is per tensor, unless ``threshold`` gives each input's cut over its whole task vector (the
    paper's trim; the engine finds it with ``sparsify.whole_model_thresholds`` when ``trim: model``).
    """
    if threshold is not None:
        if rescale == "l1":
            def whole(d: torch.Tensor, i: int, own: bool) -> torch.Tensor:
                return l1_rescaled(d, torch.where(d.abs() >= threshold[i], d, torch.zeros_like(d)))
            return task_vectors(tensors, base, weight, whole, consensus=True, normalize=normalize, lambda_=lambda_,
                                inplace=inplace)
        return task_vectors(tensors, base, weight, consensus=True, normalize=normalize, lambda_=lambda_, inplace=inplace,
                            cutoff=lambda x, i: Cutoff(threshold[i]))
    mergekit = compat == "mergekit"
    if rescale != "l1":
        fused = ties_fused(tensors, base, weight, density, normalize, lambda_, mergekit)
        if fused is not None:
            return fused
    tied: set[int] = set()  # inputs whose cut falls inside a run of equal |δ| (mergekit order needs a sort)

    def cutoff(x: torch.Tensor, i: int) -> Cutoff | None:
        # an L1 rescale needs the whole trimmed delta, so it goes through ties_trim
        if rescale == "l1":
            return None
        cut = ties_cutoff(x, base, density[i], mergekit)
        if cut is None:
            tied.add(i)
        return cut

    def sparsify(d: torch.Tensor, i: int, own: bool) -> torch.Tensor:
        return ties_trim(d, density[i], rescale, inplace=own, mergekit=mergekit, tie_at_cut=i in tied)

    return task_vectors(tensors, base, weight, sparsify, consensus=True, normalize=normalize, lambda_=lambda_,
                        inplace=inplace, cutoff=cutoff)


def _dare(consensus: bool):
    def dare(tensors, base, weight, density, normalize=False, lambda_=1.0, rescale="paper", generators=None,
             inplace=False):
        gens = generators or [None] * len(tensors)
        return task_vectors(tensors, base, weight, lambda d, i, own: dare_drop(d, density[i], rescale, gens[i]),
                            consensus=consensus, normalize=normalize, lambda_=lambda_, inplace=inplace)
    dare.__doc__ = f"DARE: drop each δ entry with prob. 1−density, rescale survivors; then {'TIES' if consensus else 'task arithmetic'}."
    return dare


dare_linear = _dare(False)
dare_ties = _dare(True)


def _breadcrumbs(consensus: bool):
    def breadcrumbs(tensors, base, weight, density, gamma, normalize=False, lambda_=1.0, mask="row",
                    rescale=None, compat=None, inplace=False):
        def sparsify(d: torch.Tensor, i: int, own: bool) -> torch.Tensor:
            kept = d * breadcrumbs_mask(d, density[i], gamma[i], per_row=mask == "row", mergekit=compat == "mergekit")
            return l1_rescaled(d, kept) if rescale == "l1" else kept
        return task_vectors(tensors, base, weight, sparsify, consensus=consensus, normalize=normalize, lambda_=lambda_,
                            inplace=inplace)
    breadcrumbs.__doc__ = ("Model Breadcrumbs: keep the band of |δ| below the top-γ outliers holding a density "
                           f"fraction{'; then TIES sign election' if consensus else ''}.")
    return breadcrumbs


breadcrumbs = _breadcrumbs(False)
breadcrumbs_ties = _breadcrumbs(True)


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


def model_stock(tensors: list[torch.Tensor], base: torch.Tensor, filter_wise: bool = False) -> torch.Tensor:
    """Model Stock: t = N·cosθ / (1 + (N−1)·cosθ), θ = t·mean(θᵢ) + (1−t)·θ_base; per row when filter_wise."""
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
            norms = (a.norm(dim=-1) * b.norm(dim=-1)).clamp(min=1e-6)
            cosines.append(((a * b).sum(dim=-1) / norms).clamp(-1, 1))
    cos = torch.stack(cosines).mean(dim=0).unsqueeze(-1)
    n = len(ws)
    denom = 1 + (n - 1) * cos
    singular = denom.abs() < 1e-6
    t = torch.where(singular, torch.zeros_like(cos), n * cos / torch.where(singular, torch.ones_like(denom), denom))
    return (t * (sum(ws) / n) + (1 - t) * w0).reshape(shape)


# -- registry ---------------------------------------------------------------------------------

@dataclass(frozen=True)
class Param:
    """One parameter: ``scope`` 'model' (one value per input, mergekit's per-model parameters) or 'global'."""
    name: str
    kind: type
    default: object
    scope: str = "global"
    low: float | None = None
    high: float | None = None
    choices: tuple = ()
    help: str = ""
    mergekit: object = None  # the default under ``compat: mergekit`` where mergekit differs from the paper

    def check(self, value, where: str):
        if self.kind is bool:
            if not isinstance(value, bool):
                raise WeightsmithError(f"{where}: parameter {self.name!r} must be true or false, got {value!r}")
            return value
        if self.choices:
            if value not in self.choices:
                raise WeightsmithError(f"{where}: parameter {self.name!r} must be one of {', '.join(map(str, self.choices))}; got {value!r}")
            return value
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise WeightsmithError(f"{where}: parameter {self.name!r} must be a number, got {value!r}")
        value = float(value)
        if not math.isfinite(value) or (self.low is not None and value < self.low) or (self.high is not None and value > self.high):
            lo = "-inf" if self.low is None else self.low
            hi = "inf" if self.high is None else self.high
            raise WeightsmithError(f"{where}: parameter {self.name!r} = {value} is outside [{lo}, {hi}]")
        return value


@dataclass(frozen=True)
class Method:
    name: str
    fn: Callable | None
    title: str
    url: str
    params: tuple[Param, ...] = ()
    base: str = "none"  # 'required', 'none'
    min_models: int = 1
    max_models: int | None = None
    random: bool = False
    whole_model: str | None = None  # "module:function" for methods that need whole models or data
    notes: str = ""
    param_map: dict = field(default_factory=dict)

    def param(self, name: str) -> Param | None:
        return next((p for p in self.params if p.name == name), None)


WEIGHT = Param("weight", float, 1.0, "model", help="per-model weight")
DENSITY = Param("density", float, 1.0, "model", 0.0, 1.0, help="fraction of each task vector kept")
LAMBDA = Param("lambda", float, 1.0, "global", help="scale of the merged task vector")
COMPAT = Param("compat", str, "paper", choices=("paper", "mergekit"),
               help="'mergekit' switches TIES' trim to per tensor, DARE rescale to l1, breadcrumbs to mergekit's "
                    "per-tensor counts, and breaks ties in |delta| at a top-k threshold as mergekit's sort does")


def _normalize(default: bool) -> Param:
    return Param("normalize", bool, default, help="divide by the summed weights")


REGISTRY: dict[str, Method] = {m.name: m for m in [
    Method("linear", linear, "Linear / uniform soup", "https://arxiv.org/abs/2203.05482",
           (WEIGHT, _normalize(True))),
    Method("task_arithmetic", task_arithmetic, "Task Arithmetic", "https://arxiv.org/abs/2212.04089",
           (WEIGHT, _normalize(False), LAMBDA), base="required"),
    Method("ties", ties, "TIES", "https://arxiv.org/abs/2306.01708",
           (WEIGHT, DENSITY, _normalize(True), LAMBDA,
            Param("rescale", str, "none", choices=("none", "l1"), help="rescale trimmed deltas to their L1 norm"),
            Param("trim", str, "model", choices=("model", "tensor"), mergekit="tensor",
                  help="top-density |delta| over each whole task vector (paper) or per tensor (mergekit)"),
            COMPAT),
           base="required"),
    *[Method(n, f, t, "https://arxiv.org/abs/2311.03099",
             (WEIGHT, DENSITY, _normalize(False), LAMBDA,
              Param("rescale", str, "paper", choices=("paper", "l1", "none"), mergekit="l1",
                    help="survivor rescale: 'paper' 1/density, 'l1' L1-norm matching as mergekit"), COMPAT),
             base="required", random=True)
      for n, f, t in (("dare_linear", dare_linear, "DARE (linear)"), ("dare_ties", dare_ties, "DARE TIES"))],
    *[Method(n, f, t, "https://arxiv.org/abs/2312.06795",
             (WEIGHT, DENSITY, Param("gamma", float, 0.01, "model", 0.0, 1.0, help="fraction of top |δ| outliers removed"),
              _normalize(False), LAMBDA,
              Param("mask", str, "row", choices=("row", "tensor"), mergekit="tensor", help="fractions per row (paper) or per tensor (mergekit)"),
              Param("rescale", str, "none", choices=("none", "l1")), COMPAT),
             base="required")
      for n, f, t in (("breadcrumbs", breadcrumbs, "Model Breadcrumbs"),
                      ("breadcrumbs_ties", breadcrumbs_ties, "Model Breadcrumbs + TIES"))],
    Method("slerp", slerp, "SLERP", "https://en.wikipedia.org/wiki/Slerp",
           (Param("t", float, 0.5, "global", 0.0, 1.0, help="0 = base, 1 = other model"),), base="required",
           min_models=1, max_models=1),
    Method("model_stock", model_stock, "Model Stock", "https://arxiv.org/abs/2403.19522",
           (Param("filter_wise", bool, False, help="one ratio per output row"),), base="required", min_models=2),
    Method("mwa", linear, "Metrics-Weighted Averaging", "https://arxiv.org/abs/2504.18580",
           (Param("metric", str, "loss", choices=("loss", "step"), help="1/loss or step as each checkpoint's metric"),
            Param("p", float, 1.0, "global", 0.0, help="penalty factor: w_i = m_i^p / sum m_j^p"),
            Param("metric_value", float, None, "model", 0.0, help="the metric, when not read from trainer_state.json")),
           notes="weights computed from the checkpoints' metrics, then a linear merge"),
    Method("greedy_soup", None, "Greedy soup", "https://arxiv.org/abs/2203.05482", (), min_models=1,
           whole_model="weightsmith.merge.soup:greedy_soup_recipe"),
    Method("pleas", None, "PLeaS", "https://arxiv.org/abs/2407.02447", (), min_models=2, max_models=2,
           whole_model="weightsmith.merge.pleas:merge_recipe"),
]}


def get_method(name: str) -> Method:
    try:
        return REGISTRY[name]
    except KeyError:
        raise WeightsmithError(
            f"unknown merge_method {name!r}; known: {', '.join(sorted(REGISTRY))}") from None
