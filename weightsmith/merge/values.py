"""What a merge refuses about values: checked from the headers before any tensor is read, then on each
tensor's inputs and result.

- before reading: a tensor stored as an integer in one input and as a float in another (the merge would
  average integers as floats, or keep one model's integers and drop the others' floats); weights that
  sum to 0 under ``normalize`` (the division would be skipped or blow up);
- inputs: NaN or inf in a float input is refused, naming the model and the tensor; with
  ``allow_nonfinite`` it is counted per tensor in ``report`` and the merge goes on;
- results: a non-finite result from finite inputs (e.g. a float16 overflow), or an all-zero result from
  inputs that were not all zero, is refused; so is a non-finite result without ``allow_nonfinite``.
"""
from __future__ import annotations

import math
from collections.abc import Callable
from pathlib import Path

import torch

from ..errors import WeightsmithError


class ValueChecks:
    """Built from a merge plan (runs the header checks); ``run`` wraps the merge of one tensor."""

    def __init__(self, plan, sources: list, allow_nonfinite: bool = False):
        self.sources = [Path(c.path) for c in sources]
        self.allow_nonfinite = allow_nonfinite
        self.report: list[dict] = []
        everyone = ([plan.base] if plan.base is not None else []) + list(plan.models)
        for job in plan.jobs:
            kinds = {c.info(job.name).torch_dtype.is_floating_point: c for c in everyone}
            if len(kinds) == 2:
                raise WeightsmithError(
                    f"{kinds[False].path}: tensor {job.name!r} is stored as {kinds[False].info(job.name).dtype} but "
                    f"{kinds[True].path} stores it as {kinds[True].info(job.name).dtype}; integer and float tensors "
                    "cannot be merged (convert the inputs to one dtype)")
            weight = job.kwargs.get("weight")
            if job.kwargs.get("normalize") and isinstance(weight, list) and weight and sum(weight) == 0:
                raise WeightsmithError(
                    f"recipe: tensor {job.name!r}: weights {weight} sum to 0, so normalize cannot divide by them; "
                    "change the weights or set normalize: false")

    def run(self, name: str, inputs: list[torch.Tensor], merge: Callable[[], torch.Tensor]) -> torch.Tensor:
        """``merge()`` of one tensor's ``inputs`` (one per source, in order), refused or reported as above.
        The inputs are checked before ``merge`` runs (methods may overwrite them). One ``aminmax`` pass per
        tensor answers both questions: NaN propagates into it, inf shows as a bound, all-zero is [0, 0]."""
        spans = [_span(t) for t in inputs]
        bad = [(path, t) for path, t, span in zip(self.sources, inputs, spans) if not _finite(t, span)]
        for path, t in bad:
            count = int((~torch.isfinite(t)).sum())
            if not self.allow_nonfinite:
                raise WeightsmithError(
                    f"{path}: tensor {name!r} holds {count} NaN/inf value(s); the merge would spread them. Repair "
                    "the input, or pass --allow-nonfinite to merge anyway (reported per tensor)")
            self.report.append({"model": str(path), "tensor": name, "nonfinite": count})
        nonzero = any(span is not None and span != (0, 0) for span in spans)
        kept_nonfinite = bool(bad)
        del bad
        result = merge()
        span = _span(result)
        if not _finite(result, span):
            if not kept_nonfinite:
                raise WeightsmithError(
                    f"merged tensor {name!r} is not finite although its inputs are (overflow in the output dtype? "
                    "try --dtype float32 or smaller weights)")
        elif nonzero and span == (0, 0):
            raise WeightsmithError(
                f"merged tensor {name!r} is all zeros although its inputs are not (weights cancelling out?); "
                "check the recipe's weights")
        return result


def _span(t: torch.Tensor) -> tuple[float, float] | None:
    if t.numel() == 0:
        return None
    lo, hi = torch.aminmax(t)
    return float(lo), float(hi)


def _finite(t: torch.Tensor, span: tuple[float, float] | None) -> bool:
    return span is None or not t.is_floating_point() or (math.isfinite(span[0]) and math.isfinite(span[1]))
