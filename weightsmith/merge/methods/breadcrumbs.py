"""Model Breadcrumbs (Davari and Belilovsky 2023): of each task vector keep the band of |δ| below the top-γ
outliers that holds a density fraction, per row (the paper) or per tensor (mergekit); then task arithmetic
or TIES' sign election (``breadcrumbs_ties``).
"""
from __future__ import annotations

import torch

from ..native import compat_native
from ..native.sparsify import breadcrumbs_mask, l1_rescaled
from ..registry import Param, merge_method
from .average import WEIGHT, normalize_param
from .task_arithmetic import DENSITY, INT8_MASK, LAMBDA, TASK_COMPAT, TASK_VECTOR, task_vectors

BREADCRUMBS_PARAMS = (
    WEIGHT, DENSITY, Param("gamma", float, 0.01, "model", 0.0, 1.0, help="fraction of top |delta| outliers removed"),
    normalize_param(False), LAMBDA,
    Param("mask", str, "row", choices=("row", "tensor"), mergekit="tensor",
          help="fractions per row (paper) or per tensor (mergekit)"),
    Param("rescale", str, "none", choices=("none", "l1"), help="rescale kept deltas to their L1 norm"),
    TASK_COMPAT, INT8_MASK)


def _breadcrumbs(tensors, base, weight, density, gamma, normalize, lambda_, mask, rescale, compat, inplace,
                 consensus: bool):
    def sparsify(d: torch.Tensor, i: int, own: bool) -> torch.Tensor:
        kept = d * breadcrumbs_mask(d, density[i], gamma[i], per_row=mask == "row", mergekit=compat == "mergekit")
        return l1_rescaled(d, kept) if rescale == "l1" else kept
    return task_vectors(tensors, base, weight, sparsify, consensus=consensus, normalize=normalize, lambda_=lambda_,
                        inplace=inplace)


@merge_method("breadcrumbs", title="Model Breadcrumbs", url="https://arxiv.org/abs/2312.06795",
              params=BREADCRUMBS_PARAMS, reference=compat_native.breadcrumbs, **TASK_VECTOR)
def breadcrumbs(tensors, base, weight, density, gamma, normalize=False, lambda_=1.0, mask="row", rescale=None,
                compat=None, inplace=False):
    """Model Breadcrumbs: keep the band of |δ| below the top-γ outliers holding a density fraction."""
    return _breadcrumbs(tensors, base, weight, density, gamma, normalize, lambda_, mask, rescale, compat, inplace,
                        consensus=False)


@merge_method("breadcrumbs_ties", title="Model Breadcrumbs + TIES", url="https://arxiv.org/abs/2312.06795",
              params=BREADCRUMBS_PARAMS, reference=compat_native.breadcrumbs_ties, **TASK_VECTOR)
def breadcrumbs_ties(tensors, base, weight, density, gamma, normalize=False, lambda_=1.0, mask="row", rescale=None,
                     compat=None, inplace=False):
    """Model Breadcrumbs: keep the band of |δ| below the top-γ outliers holding a density fraction; then TIES
    sign election."""
    return _breadcrumbs(tensors, base, weight, density, gamma, normalize, lambda_, mask, rescale, compat, inplace,
                        consensus=True)
