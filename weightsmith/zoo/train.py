"""A small causal-LM training loop: random windows of a token stream, AdamW, warmup + cosine."""
from __future__ import annotations

import math
from collections.abc import Callable

import torch

from ..progress import ProgressFn, report


def random_windows(tokens: torch.Tensor, batch: int, seq: int, gen: torch.Generator) -> torch.Tensor:
    starts = torch.randint(0, tokens.numel() - seq - 1, (batch,), generator=gen)
    return torch.stack([tokens[s:s + seq] for s in starts.tolist()])


def lr_at(step: int, steps: int, lr: float, warmup: int) -> float:
    if step < warmup:
        return lr * (step + 1) / warmup
    frac = (step - warmup) / max(1, steps - warmup)
    return lr * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * frac)))


def train_lm(model: torch.nn.Module, tokens: torch.Tensor, *, steps: int, lr: float, batch: int, seq: int,
             seed: int, warmup: int | None = None, weight_decay: float = 0.01,
             on_step: Callable[[int, float], None] | None = None,
             progress: ProgressFn | None = None, label: str = "training", optimizer: str = "adamw") -> list[float]:
    """Train in place; returns the per-step losses. ``on_step(step, loss)`` runs after each step.
    ``optimizer``: 'adamw', or 'sgd' (momentum 0.9, no weight decay)."""
    gen = torch.Generator().manual_seed(seed)
    if optimizer == "sgd":
        opt = torch.optim.SGD(model.parameters(), lr=lr, momentum=0.9)
    else:
        opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=weight_decay, betas=(0.9, 0.98))
    warmup = warmup if warmup is not None else max(1, steps // 20)
    model.train()
    losses = []
    for step in range(steps):
        for g in opt.param_groups:
            g["lr"] = lr_at(step, steps, lr, warmup)
        x = random_windows(tokens, batch, seq, gen)
        loss = model(input_ids=x, labels=x).loss
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        losses.append(loss.item())
        if on_step is not None:
            on_step(step + 1, losses[-1])
        report(progress, label, step + 1, steps)
    model.eval()
    return losses
