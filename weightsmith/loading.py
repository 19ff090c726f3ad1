"""``weightsmith.load``: any folder weightsmith writes (plain, folded, hashed) as a transformers model."""
from __future__ import annotations

from pathlib import Path

import torch

from .checkpoint import read_json
from .checkpoint.formats import FORMATS, folder_format, format_module  # noqa: F401  (re-exported)
from .device import resolve_device, resolve_dtype
from .errors import WeightsmithError


def model_class(config: dict):
    import transformers

    for arch in config.get("architectures") or []:
        cls = getattr(transformers, arch, None)
        if cls is not None:
            return cls
    return transformers.AutoModel


def load(path: str | Path, device: str | torch.device = "cpu", dtype: str | torch.dtype | None = None,
         allow_pickle: bool = False) -> torch.nn.Module:
    """Load a model folder in eval mode on ``device`` (plain HF, folded or RPS)."""
    path = Path(path)
    dev = resolve_device(device)
    dt = resolve_dtype(dtype)
    fmt = folder_format(path)
    if fmt != "plain":
        return format_module(fmt).load(path, device=dev, dtype=dt)
    if not list(path.glob("*.safetensors")) and not allow_pickle:
        from .checkpoint import Checkpoint
        Checkpoint(path, allow_pickle=False)  # raises the clear error
    config = read_json(path / "config.json", "config.json")
    cls = model_class(config)
    kwargs = {"dtype": dt} if dt is not None else {}
    # stages report progress through callbacks; transformers' own loading bar would print
    from transformers.utils import logging as hf_logging

    bars = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()
    try:
        model = cls.from_pretrained(path, use_safetensors=not allow_pickle or None, **kwargs)
    finally:
        if bars:
            hf_logging.enable_progress_bar()
    return model.to(dev).eval()
