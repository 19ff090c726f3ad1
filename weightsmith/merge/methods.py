"""Merge methods as pure functions on tensors, each declared once with ``@merge_method`` under its
mergekit YAML name (the contract is in ``registry``).

Each function takes the inputs' tensors for one tensor name (plus the base's where the method
needs one) and the resolved parameters, and returns the merged tensor in float32. Formulas follow
the papers named in the declarations (soups, task arithmetic, TIES, DARE, Model Breadcrumbs, SLERP,
Model Stock, MWA); where mergekit chose differently, ``compat: mergekit`` selects its behaviour.
"""
from __future__ import annotations

from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import torch

from ..errors import WeightsmithError
from . import compat_native
from . import reference as ref
from .mixing import Cutoff, Source, mix
from .registry import COMPAT, REGISTRY, Method, Param, PlanCheck, get_method, merge_method, resolve_globals
from .sparsify import breadcrumbs_mask, dare_drop, l1_rescaled, ties_cutoff, ties_fused, ties_trim, whole_model_thresholds

__all__ = ["COMPAT", "REGISTRY", "Method", "Param", "get_method", "merge_method"]

WEIGHT = Param("weight", float, 1.0, "model", help="per-model weight")
DENSITY = Param("density", float, 1.0, "model", 0.0, 1.0, help="fraction of each task vector kept")
LAMBDA = Param("lambda", float, 1.0, "global", help="scale of the merged task vector")
TASK_COMPAT = Param("compat", str, "paper", choices=("paper", "mergekit"),
                    help="'mergekit' switches TIES' trim to per tensor, DARE rescale to l1, breadcrumbs to mergekit's "
                         "per-tensor counts, breaks ties in |delta| at a top-k threshold as mergekit's sort does, "
                         "and does the arithmetic in the recipe's dtype")
INT8_MASK = Param("int8_mask", bool, False, arg=None,
                  help="accepted from mergekit recipes; changes nothing (masks are exact either way)")


def normalize_param(default: bool) -> Param:
    return Param("normalize", bool, default, help="divide by the summed weights")


# the task-vector fast paths reproduce mergekit's float32 arithmetic bit for bit (tests/merge)
TASK_VECTOR = dict(base="required", inplace=True, compat_fast=True)


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
              params=(WEIGHT, normalize_param(False), LAMBDA, INT8_MASK), reference=compat_native.task_arithmetic, **TASK_VECTOR)
def task_arithmetic(tensors, base, weight, normalize=False, lambda_=1.0, inplace=False):
    """Task arithmetic (Ilharco et al. 2023): θ_base + λ Σ wᵢ δᵢ."""
    return task_vectors(tensors, base, weight, normalize=normalize, lambda_=lambda_, inplace=inplace)


def _one_density_per_model(check: PlanCheck) -> None:
    """TIES' whole-model trim cuts each task vector at one threshold: one density per model."""
    whole = [kw for _, kw in check.tensors if kw.get("trim") == "model"]
    for i, path in enumerate(check.models if whole else []):
        densities = sorted({kw["density"][i] for kw in whole})
        if len(densities) > 1:
            raise WeightsmithError(
                f"{check.where}: model {path}: trim: model (TIES' whole-model trim) takes one density per model, got "
                f"{len(densities)} across tensors ({densities[0]:g}..{densities[-1]:g}); use trim: tensor for "
                "densities that vary by layer")


def _whole_model_trim(jobs, stream, progress) -> None:
    """Each input's TIES threshold over its whole task vector (the jobs with ``trim: model``), found in two
    reading passes before the merge; those jobs then cut at it."""
    from ..progress import report

    jobs = [j for j in jobs if j.kwargs.get("trim") == "model"]
    if not jobs:
        return
    label = "trim thresholds"
    done = [0]

    def tensors():
        for inputs in stream(jobs):
            yield inputs[0], inputs[1:]
            del inputs  # unmapped before the next tensor is read (unless it is read ahead)
            done[0] += 1
            report(progress, label, done[0], 2 * len(jobs))

    total = sum(torch.Size(j.shape).numel() for j in jobs)
    thresholds = whole_model_thresholds(tensors, jobs[0].kwargs["density"], total)
    for job in jobs:
        job.kwargs["threshold"] = thresholds


@merge_method("ties", title="TIES", url="https://arxiv.org/abs/2306.01708",
              params=(WEIGHT, DENSITY, normalize_param(True), LAMBDA,
                      Param("rescale", str, "none", choices=("none", "l1"), help="rescale trimmed deltas to their L1 norm"),
                      Param("trim", str, "model", choices=("model", "tensor"), mergekit="tensor",
                            help="top-density |delta| over each whole task vector (paper) or per tensor (mergekit)"),
                      TASK_COMPAT, INT8_MASK),
              validate=_one_density_per_model, prepass=_whole_model_trim, reference=compat_native.ties, **TASK_VECTOR)
def ties(tensors, base, weight, density, normalize=True, lambda_=1.0, rescale=None, compat=None, inplace=False,
         threshold=None, trim="tensor"):
    """TIES: trim each δᵢ to its top-density |δ|, elect signs, disjoint mean.

    The trim is per tensor, unless ``threshold`` gives each input's cut over its whole task vector (the
    paper's trim, ``trim: model``; the engine's pre-pass ``_whole_model_trim`` finds it).
    """
    if trim == "model" and threshold is None:
        raise ValueError("ties: trim='model' needs each input's whole-model threshold (the engine's pre-pass)")
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
             inplace=False, compat=None):
        gens = generators or [None] * len(tensors)
        return task_vectors(tensors, base, weight, lambda d, i, own: dare_drop(d, density[i], rescale, gens[i]),
                            consensus=consensus, normalize=normalize, lambda_=lambda_, inplace=inplace)
    dare.__doc__ = f"DARE: drop each δ entry with prob. 1−density, rescale survivors; then {'TIES' if consensus else 'task arithmetic'}."
    return dare


def _dare_params(consensus: bool) -> tuple[Param, ...]:
    return (WEIGHT, DENSITY, normalize_param(False), LAMBDA,
            Param("rescale", str, "paper", choices=("paper", "l1", "none"), mergekit="l1",
                  help="survivor rescale: 'paper' 1/density, 'l1' L1-norm matching as mergekit"), TASK_COMPAT, INT8_MASK)


dare_linear = merge_method("dare_linear", title="DARE (linear)", url="https://arxiv.org/abs/2311.03099",
                           params=_dare_params(False), random=True, reference=compat_native.dare_linear, **TASK_VECTOR)(_dare(False))
dare_ties = merge_method("dare_ties", title="DARE TIES", url="https://arxiv.org/abs/2311.03099",
                         params=_dare_params(True), random=True, reference=compat_native.dare_ties, **TASK_VECTOR)(_dare(True))


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


def _breadcrumbs_params(consensus: bool) -> tuple[Param, ...]:
    return (WEIGHT, DENSITY, Param("gamma", float, 0.01, "model", 0.0, 1.0, help="fraction of top |delta| outliers removed"),
            normalize_param(False), LAMBDA,
            Param("mask", str, "row", choices=("row", "tensor"), mergekit="tensor",
                  help="fractions per row (paper) or per tensor (mergekit)"),
            Param("rescale", str, "none", choices=("none", "l1"), help="rescale kept deltas to their L1 norm"),
            TASK_COMPAT, INT8_MASK)


breadcrumbs = merge_method("breadcrumbs", title="Model Breadcrumbs", url="https://arxiv.org/abs/2312.06795",
                           params=_breadcrumbs_params(False), reference=compat_native.breadcrumbs, **TASK_VECTOR)(_breadcrumbs(False))
breadcrumbs_ties = merge_method("breadcrumbs_ties", title="Model Breadcrumbs + TIES", url="https://arxiv.org/abs/2312.06795",
                                params=_breadcrumbs_params(True), reference=compat_native.breadcrumbs_ties,
                                **TASK_VECTOR)(_breadcrumbs(True))


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


merge_method("model_stock", title="Model Stock", url="https://arxiv.org/abs/2403.19522",
             params=(Param("filter_wise", bool, False, help="one ratio per output row"),), base="required",
             min_models=2, mergekit_ignores=("weight",), reference=model_stock)(model_stock)


# -- methods that are not one tensor function -----------------------------------------------------

def _mwa_linear(recipe, params: dict, where: str):
    """MWA's weights from the checkpoints' metrics; the merge is then a normalized linear one."""
    from .mwa import checkpoint_metric, mwa_weights
    from .recipe import ModelEntry, Recipe

    method = get_method("mwa")
    metric, p = params["metric"], params["p"]
    values = []
    for m in recipe.models:
        given = m.parameters.get("metric_value")
        if given is not None:
            v = method.param("metric_value").check(given, f"{where}: model {m.path}")
            values.append(1.0 / v if metric == "loss" else v)
        else:
            if not Path(m.path).is_dir():
                raise WeightsmithError(f"model {m.path}: folder not found")
            values.append(checkpoint_metric(m.path, metric))
    weights = mwa_weights(values, p)
    linear_recipe = Recipe("linear", [ModelEntry(m.path, {"weight": w}) for m, w in zip(recipe.models, weights)],
                           recipe.base_model, {"normalize": True, **({"compat": recipe.parameters["compat"]}
                                                                      if "compat" in recipe.parameters else {})},
                           recipe.dtype, recipe.text, out_dtype=recipe.out_dtype)
    card = {"metric": metric, "p": p, "weights": {m.path: round(w, 6) for m, w in zip(recipe.models, weights)}}
    return linear_recipe, card


merge_method("mwa", title="Metrics-Weighted Averaging", url="https://arxiv.org/abs/2504.18580",
             params=(Param("metric", str, "loss", choices=("loss", "step"), help="1/loss or step as each checkpoint's metric"),
                     Param("p", float, 1.0, "global", 0.0, help="penalty factor: w_i = m_i^p / sum m_j^p"),
                     Param("metric_value", float, None, "model", 0.0,
                           help="the metric, when not read from trainer_state.json")),
             rewrite=_mwa_linear, notes="weights computed from the checkpoints' metrics, then a linear merge")(None)

merge_method("greedy_soup", title="Greedy soup", url="https://arxiv.org/abs/2203.05482",
             params=(Param("data", str, help="held-out text file scored by perplexity (lower is better)"),
                     Param("labelled", str, help="held-out labelled file scored by accuracy (higher is better)"),
                     Param("max_tokens", int, None, low=1, help="tokens of --data used for perplexity (default: all)"),
                     Param("compat", str, "paper", choices=("paper", "mergekit"), arg=None,
                           help="passed to the linear merges of the soup")),
             whole_model="weightsmith.merge.soup:greedy_soup_recipe",
             notes="ingredients join a uniform soup only if the held-out score improves")(None)

merge_method("pleas", title="PLeaS", url="https://arxiv.org/abs/2407.02447",
             params=(Param("data", str, help="calibration text (the fine-tuning data, or generic text)"),
                     Param("width", float, 1.2, low=1.0, high=2.0, help="output size in model widths"),
                     Param("metric", str, "euclidean", choices=("euclidean", "correlation"),
                           help="activation similarity used to match units"),
                     Param("ridge", float, 1e-4, low=0.0, help="ridge of the layer-wise least squares"),
                     Param("least_squares", bool, True, help="refit each layer on both models' activations"),
                     Param("inputs", str, "merged", choices=("merged", "original"),
                           help="least-squares inputs: the merged model's activations or the originals'"),
                     Param("max_tokens", int, 8192, low=1, help="calibration tokens"),
                     Param("seq_len", int, 128, low=1, help="calibration sequence length"),
                     Param("batch_size", int, 8, low=1, help="calibration batch size")),
             min_models=2, max_models=2, whole_model="weightsmith.merge.pleas:merge_recipe",
             notes="two models; permutation alignment, partial merging and least squares need calibration data")(None)
