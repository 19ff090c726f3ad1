"""What a merge refuses about values: checked from the headers before any tensor is read, then on each
tensor's inputs and result.

- before reading: a float8 or wide unsigned tensor (nothing to check or average it with); a tensor stored as an integer in one input and as a float in another (the merge would
  average integers as floats, or keep one model's integers and drop the others' floats); weights that
  sum to 0 under ``normalize`` (the division would be skipped or blow up);
- inputs: NaN or inf in a float input is refused, naming the model and the tensor; with
  ``allow_nonfinite`` it is counted per tensor in ``report`` and the merge goes on;
- results: a non-finite result from finite inputs (e.g. a float16 overflow), or an all-zero result from
  inputs that were not all zero, is refused; so is a non-finite result without ``allow_nonfinite``.
"""
from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import torch

from ..checkpoint.values import finite, nonfinite_count, span
from ..errors import WeightsmithError, needs_option

# Safetensors dtypes torch cannot check (aminmax, isfinite) or average: refused by name before any tensor is read.
NOT_MERGEABLE = ("F8_E4M3", "F8_E5M2", "U16", "U32", "U64")


class ValueChecks:
    """Built from a merge plan's jobs (runs the header checks); ``run`` wraps the merge of one tensor."""

    def __init__(self, jobs: list, allow_nonfinite: bool = False):
        self.allow_nonfinite = allow_nonfinite
        self.report: list[dict] = []
        for job in jobs:
            pairs = job.inputs
            for c, n in pairs:
                if c.info(n).dtype in NOT_MERGEABLE:
                    raise WeightsmithError(
                        f"{c.path}: tensor {n!r} is stored as {c.info(n).dtype}, which merge does not compute on "
                        "(no NaN check or arithmetic on float8 or unsigned 16-64 bit tensors); convert the input "
                        "to bfloat16 or float32 first")
            kinds = {c.info(n).torch_dtype.is_floating_point: (c, n) for c, n in pairs}
            if len(kinds) == 2:
                (ci, ni), (cf, nf) = kinds[False], kinds[True]
                raise WeightsmithError(
                    f"{ci.path}: tensor {ni!r} is stored as {ci.info(ni).dtype} but {cf.path} stores {nf!r} as "
                    f"{cf.info(nf).dtype}; integer and float tensors cannot be merged (convert the inputs to one dtype)")
            weight = job.kwargs.get("weight")
            if job.kwargs.get("normalize") and isinstance(weight, list) and weight and sum(weight) == 0:
                raise WeightsmithError(
                    f"recipe: tensor {job.name!r}: weights {weight} sum to 0, so normalize cannot divide by them; "
                    "change the weights or set normalize: false")

    def run(self, name: str, inputs: list[torch.Tensor], merge: Callable[[], torch.Tensor], paths: list,
            zero_ok: bool = False) -> torch.Tensor:
        """``merge()`` of one tensor's ``inputs`` (``paths[i]`` holds ``inputs[i]``), refused or reported as above.
        ``zero_ok``: the recipe itself asks for zeros (``zero_requested``), so an all-zero result is no error.
        The inputs are checked before ``merge`` runs (methods may overwrite them)."""
        kept_nonfinite, nonzero = check_inputs(name, inputs, [Path(p) for p in paths], self.allow_nonfinite,
                                               self.report)
        result = merge()
        check_result(name, result, kept_nonfinite, nonzero, zero_ok)
        return result


def check_inputs(name: str, inputs: list[torch.Tensor], paths: list[Path], allow_nonfinite: bool,
                 report: list[dict]) -> tuple[bool, bool]:
    """One tensor's inputs (``paths[i]`` holds ``inputs[i]``): NaN/inf refused naming the model, or counted into
    ``report`` with ``allow_nonfinite``. Returns (some input is non-finite, some input is not all zeros).
    One ``aminmax`` pass per tensor answers both: NaN propagates into it, inf shows as a bound, all-zero
    is [0, 0]."""
    spans = [span(t) for t in inputs]
    bad = [(path, t) for path, t, bounds in zip(paths, inputs, spans) if not finite(t, bounds)]
    for path, t in bad:
        count = nonfinite_count(t)
        if not allow_nonfinite:
            raise needs_option(
                f"{path}: tensor {name!r} holds {count} NaN/inf value(s); the merge would spread them. Repair "
                "the input", ", or set {0} to merge anyway (reported per tensor)", "allow_nonfinite")
        report.append({"model": str(path), "tensor": name, "nonfinite": count})
    return bool(bad), any(bounds is not None and bounds != (0, 0) for bounds in spans)


def check_result(name: str, result: torch.Tensor, kept_nonfinite: bool, nonzero: bool, zero_ok: bool = False) -> None:
    """A merged tensor: non-finite refused unless its inputs were (and allowed), all zeros refused when its
    inputs were not all zero unless the recipe asks for zeros (``zero_ok``)."""
    bounds = span(result)
    if not finite(result, bounds):
        if not kept_nonfinite:
            raise needs_option(
                f"merged tensor {name!r} is not finite although its inputs are (overflow in the output dtype? ",
                "try {0} float32 or smaller weights)", "dtype")
    elif nonzero and bounds == (0, 0) and not zero_ok:
        raise WeightsmithError(
            f"merged tensor {name!r} is all zeros although its inputs are not (weights cancelling out?); "
            "check the recipe's weights")


def check_whole_models(inputs: list[tuple[Path, dict[str, torch.Tensor]]], allow_nonfinite: bool = False):
    """The same checks for merges that build a whole model at once (PLeaS): ``inputs`` are (folder, state dict)
    pairs, checked now, name by name; returns (report, check) where ``check(result_state)`` checks every
    merged tensor against its name's inputs."""
    report: list[dict] = []
    flags: dict[str, tuple[bool, bool]] = {}
    for name in dict.fromkeys(n for _, state in inputs for n in state):
        pairs = [(path, state[name]) for path, state in inputs if name in state and state[name].is_floating_point()]
        if pairs:
            flags[name] = check_inputs(name, [t for _, t in pairs], [p for p, _ in pairs], allow_nonfinite, report)

    def check(result: dict[str, torch.Tensor]) -> None:
        for name, t in result.items():
            if t.is_floating_point():
                check_result(name, t, *flags.get(name, (False, False)))
    return report, check


def zero_requested(kwargs: dict) -> bool:
    """Whether a job's ``scale`` or ``weight`` is zero for every input (a passthrough ``scale: 0`` filter
    that prunes a tensor, a layer gradient that weighs every model 0): zeros the user asked for."""
    for key in ("scale", "weight"):
        v = kwargs.get(key)
        values = [x for x in (v if isinstance(v, (list, tuple)) else [v]) if x is not None]
        if values and all(x == 0 for x in values):
            return True
    return False
