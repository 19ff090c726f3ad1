"""Calibration tokens for analyze, gates and heal: one token stream cut into equal windows.

Encoders get each window wrapped in their [CLS] ... [SEP] tokens so they see the inputs they were trained on.
"""
from __future__ import annotations

from pathlib import Path

import torch

from ..errors import WeightsmithError


def calibration_windows(tokenizer, data: str | Path, *, seq: int, max_tokens: int, causal: bool) -> torch.Tensor:
    """[windows, seq] token ids from the text file(s) at ``data`` (at most ``max_tokens`` tokens in all)."""
    from ..eval import load_texts

    texts = load_texts(data)
    wrap = [] if causal else [t for t in (tokenizer.cls_token_id, tokenizer.sep_token_id) if t is not None]
    body = seq - len(wrap)
    if body < 2:
        raise WeightsmithError(f"--seq {seq} is too short for calibration windows")
    ids: list[int] = []
    sep = tokenizer.eos_token_id if causal else None
    for t in texts:
        if ids and sep is not None:
            ids.append(sep)
        ids.extend(tokenizer(t, add_special_tokens=False)["input_ids"])
        if len(ids) >= max_tokens:
            break
    n = min(len(ids), max_tokens) // seq
    if n < 1:
        raise WeightsmithError(f"{data}: only {len(ids)} tokens, fewer than one window of --seq {seq}")
    stream = torch.tensor(ids[:n * body], dtype=torch.long).view(n, body)
    if wrap:
        cls = torch.full((n, 1), wrap[0], dtype=torch.long)
        sep_col = torch.full((n, 1), wrap[-1], dtype=torch.long)
        stream = torch.cat([cls, stream, sep_col], dim=1) if len(wrap) == 2 else torch.cat([cls, stream], dim=1)
    return stream


def model_seq(model, requested: int | None) -> int:
    limit = getattr(model.config, "max_position_embeddings", None) or getattr(model.config, "n_positions", None) or 512
    if requested and requested > limit:
        raise WeightsmithError(f"--seq {requested} exceeds the model's {limit} positions")
    return requested or min(limit, 128)
