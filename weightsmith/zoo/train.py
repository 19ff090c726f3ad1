"""The zoo's training recipe on the shared loop (``weightsmith.training``): AdamW with weight decay 0.01,
or SGD with momentum 0.9."""
from __future__ import annotations

from collections.abc import Callable

import torch

from ..progress import ProgressFn
from ..training import train_lm as _train_lm


def train_lm(model: torch.nn.Module, tokens: torch.Tensor, *, steps: int, lr: float, batch_size: int, seq_len: int,
             seed: int, warmup: int | None = None, weight_decay: float = 0.01,
             on_step: Callable[[int, float], None] | None = None,
             progress: ProgressFn | None = None, label: str = "training", optimizer: str = "adamw") -> list[float]:
    """Train in place; returns the per-step losses. ``on_step(step, loss)`` runs after each step.
    ``optimizer``: 'adamw', or 'sgd' (momentum 0.9, no weight decay)."""
    return _train_lm(model, tokens, steps=steps, lr=lr, batch_size=batch_size, seq_len=seq_len, seed=seed, warmup=warmup,
                     optimizer=optimizer, momentum=0.9, weight_decay=weight_decay, on_step=on_step,
                     progress=progress, label=label)
