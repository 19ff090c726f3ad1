"""Device (``auto|cpu|cuda[:N]``) and dtype resolution shared by every stage."""
from __future__ import annotations

import torch

from .errors import OptionError, WeightsmithError


def resolve_device(name: str | torch.device | None = "auto") -> torch.device:
    if isinstance(name, torch.device):
        return name
    if name in (None, "", "auto"):
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(name)
    except (RuntimeError, TypeError) as exc:
        raise OptionError("device", f"{name!r} is not a device: use auto, cpu, cuda or cuda:N") from exc
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise OptionError("device", f"{name}: CUDA is not available on this machine; use cpu")
    return dev


DTYPES = {
    "float32": torch.float32, "fp32": torch.float32,
    "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
    "float16": torch.float16, "fp16": torch.float16,
}


def resolve_dtype(name: str | torch.dtype | None) -> torch.dtype | None:
    if name is None or isinstance(name, torch.dtype):
        return name
    try:
        return DTYPES[name.lower()]
    except (KeyError, AttributeError):  # AttributeError: not a string at all (e.g. a YAML list)
        raise WeightsmithError(f"dtype {name!r} is not supported; choose one of float32, bfloat16, float16") from None
