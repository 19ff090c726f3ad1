"""Calibration tokens for analyze, gates and heal: one token stream cut into equal windows.

Encoders get each window wrapped in their [CLS] ... [SEP] tokens so they see the inputs they were trained on.
"""
from __future__ import annotations

from pathlib import Path

import torch

from .. import training
from ..errors import OptionError


def calibration_windows(tokenizer, data: str | Path, *, seq: int, max_tokens: int, causal: bool) -> torch.Tensor:
    """[windows, seq] token ids from the text file(s) at ``data`` (``weightsmith.training.calibration_windows``)."""
    return training.calibration_windows(tokenizer, data, seq_len=seq, max_tokens=max_tokens, causal=causal)


def model_seq(model, requested: int | None) -> int:
    limit = getattr(model.config, "max_position_embeddings", None) or getattr(model.config, "n_positions", None) or 512
    if requested and requested > limit:
        raise OptionError("seq_len", f"{requested} exceeds the model's {limit} positions")
    return requested or min(limit, 128)
