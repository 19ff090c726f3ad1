"""Random drops of task-vector entries, survivors rescaled: DARE (Yu et al. 2023) drops each entry with
probability 1 − density; DELLA (Deep et al. 2024) with a probability falling with its magnitude rank
(MAGPRUNE). Then task arithmetic (``*_linear``) or TIES' sign election (``dare_ties``, ``della``).
"""
from __future__ import annotations

import torch

from ...errors import WeightsmithError
from ..native import compat_native
from ..native.sparsify import dare_drop, l1_rescaled
from ..registry import Param, PlanCheck, merge_method
from . import reference as ref
from .average import WEIGHT, normalize_param
from .task_arithmetic import DENSITY, INT8_MASK, LAMBDA, TASK_COMPAT, TASK_VECTOR, task_vectors

DARE_RESCALE = Param("rescale", str, "paper", choices=("paper", "l1", "none"), mergekit="l1",
                     help="survivor rescale: 'paper' 1/density, 'l1' L1-norm matching as mergekit")
DARE_PARAMS = (WEIGHT, DENSITY, normalize_param(False), LAMBDA, DARE_RESCALE, TASK_COMPAT, INT8_MASK)


def _dare(tensors, base, weight, density, normalize, lambda_, rescale, generators, inplace, consensus: bool):
    gens = generators or [None] * len(tensors)
    return task_vectors(tensors, base, weight, lambda d, i, own: dare_drop(d, density[i], rescale, gens[i]),
                        consensus=consensus, normalize=normalize, lambda_=lambda_, inplace=inplace)


@merge_method("dare_linear", title="DARE (linear)", url="https://arxiv.org/abs/2311.03099", params=DARE_PARAMS,
              random=True, reference=compat_native.dare_linear, **TASK_VECTOR)
def dare_linear(tensors, base, weight, density, normalize=False, lambda_=1.0, rescale="paper", generators=None,
                inplace=False, compat=None):
    """DARE: drop each δ entry with prob. 1−density, rescale survivors; then task arithmetic."""
    return _dare(tensors, base, weight, density, normalize, lambda_, rescale, generators, inplace, consensus=False)


@merge_method("dare_ties", title="DARE TIES", url="https://arxiv.org/abs/2311.03099", params=DARE_PARAMS,
              random=True, reference=compat_native.dare_ties, **TASK_VECTOR)
def dare_ties(tensors, base, weight, density, normalize=False, lambda_=1.0, rescale="paper", generators=None,
              inplace=False, compat=None):
    """DARE: drop each δ entry with prob. 1−density, rescale survivors; then TIES."""
    return _dare(tensors, base, weight, density, normalize, lambda_, rescale, generators, inplace, consensus=True)


# -- DELLA (https://arxiv.org/abs/2406.11617) ---------------------------------------------------

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


def _della_valid(check: PlanCheck) -> None:
    for name, kw in check.tensors:
        della_check(kw["density"], kw["epsilon"], f"{check.where}: {name}")


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


def _della(tensors, base, weight, density, epsilon, normalize, lambda_, rescale, generators, consensus: bool):
    gens = generators or [None] * len(tensors)
    return task_vectors(tensors, base, weight, lambda d, i, own: della_drop(d, density[i], epsilon[i], rescale, gens[i]),
                        consensus=consensus, normalize=normalize, lambda_=lambda_)


def _della_params(normalize: bool) -> tuple[Param, ...]:
    epsilon = Param("epsilon", float, 0.15, "model", 0.0, 1.0, help="keep probabilities span density ± epsilon")
    rescale = Param("rescale", str, "l1", choices=("l1", "none"),
                    help="rescale kept deltas to the dropped delta's L1 norm (true/false as in mergekit)")
    return (WEIGHT, DENSITY, epsilon, normalize_param(normalize), LAMBDA, rescale, INT8_MASK)


@merge_method("della", title="DELLA", url="https://arxiv.org/abs/2406.11617", params=_della_params(True),
              base="required", random=True, validate=_della_valid, reference=della_reference(True))
def della(tensors, base, weight, density, epsilon, normalize=True, lambda_=1.0, rescale="l1", generators=None):
    """DELLA: MAGPRUNE drops each δ entry with a probability falling with its magnitude rank; then TIES sign
    election and disjoint mean."""
    return _della(tensors, base, weight, density, epsilon, normalize, lambda_, rescale, generators, consensus=True)


@merge_method("della_linear", title="DELLA (linear)", url="https://arxiv.org/abs/2406.11617",
              params=_della_params(False), base="required", random=True, validate=_della_valid,
              reference=della_reference(False))
def della_linear(tensors, base, weight, density, epsilon, normalize=False, lambda_=1.0, rescale="l1",
                 generators=None):
    """DELLA: MAGPRUNE drops each δ entry with a probability falling with its magnitude rank; then task
    arithmetic."""
    return _della(tensors, base, weight, density, epsilon, normalize, lambda_, rescale, generators, consensus=False)
