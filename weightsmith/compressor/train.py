"""Healing and training of RPS models: the shared causal-LM loop (``weightsmith.training``) on any device.

The index maps are cached for the duration (so each step does not re-hash) and dropped after,
so a healed model is as small in memory as a loaded one.
"""
from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

from ..device import resolve_device
from ..progress import ProgressFn
from ..training import train_lm
from .memory import HashedMemory


def fit(model: nn.Module, tokens: torch.Tensor, *, steps: int, lr: float, batch_size: int, seq_len: int, seed: int,
        device: str | torch.device = "cpu", optimizer: str = "adamw", weight_decay: float = 0.0,
        after_step: Callable[[], None] | None = None, progress: ProgressFn | None = None,
        label: str = "healing") -> list[float]:
    """Train in place with warmup + cosine; returns per-step losses. ``after_step`` runs after each update."""
    dev = resolve_device(device)
    model.to(dev)
    memories = [m for m in model.modules() if isinstance(m, HashedMemory)]
    for mem in memories:
        mem.cache_index = True
    try:
        return train_lm(model, tokens, steps=steps, lr=lr, batch_size=batch_size, seq_len=seq_len, seed=seed,
                        optimizer=optimizer, weight_decay=weight_decay, device=dev,
                        on_step=(lambda step, loss: after_step()) if after_step is not None else None,
                        progress=progress, label=label)
    finally:
        for mem in memories:
            mem.cache_index = False
            mem.clear_cache()
