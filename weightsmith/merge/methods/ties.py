"""TIES (Yadav et al. 2023): trim each task vector to its largest |δ|, elect a sign per entry, average the
agreeing deltas. The paper trims over the whole task vector (``trim: model``: its thresholds found by a
reading pass before the merge, ``_whole_model_trim``); mergekit per tensor (``trim: tensor``).
"""
from __future__ import annotations

import torch

from ...errors import WeightsmithError
from ...progress import report
from ..native import compat_native
from ..native.mixing import Cutoff
from ..native.sparsify import l1_rescaled, ties_cutoff, ties_fused, ties_trim, whole_model_thresholds
from ..registry import Param, PlanCheck, merge_method
from .average import WEIGHT, normalize_param
from .task_arithmetic import DENSITY, INT8_MASK, LAMBDA, TASK_COMPAT, TASK_VECTOR, task_vectors


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
