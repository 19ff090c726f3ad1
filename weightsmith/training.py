"""Shared training machinery: random training windows, the warmup + cosine schedule and the one causal-LM
training loop (used by the zoo and RPS healing/training; fold's heal uses its schedule)."""
from __future__ import annotations

import math
from collections.abc import Callable

import torch

from .progress import ProgressFn, report


def random_windows(tokens: torch.Tensor, batch_size: int, seq_len: int, gen: torch.Generator) -> torch.Tensor:
    """``batch_size`` windows of ``seq_len`` tokens at random starts of the stream ``tokens``."""
    starts = torch.randint(0, tokens.numel() - seq_len - 1, (batch_size,), generator=gen)
    return torch.stack([tokens[s:s + seq_len] for s in starts.tolist()])


def lr_at(step: int, steps: int, lr: float, warmup: int) -> float:
    """Linear warmup over ``warmup`` steps, then cosine decay from ``lr`` to 0.1·``lr``."""
    if step < warmup:
        return lr * (step + 1) / warmup
    frac = (step - warmup) / max(1, steps - warmup)
    return lr * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * frac)))


def _optimizer(params: list[torch.nn.Parameter], name: str, lr: float, momentum: float,
               weight_decay: float) -> torch.optim.Optimizer:
    if name == "sgd":
        return torch.optim.SGD(params, lr=lr, momentum=momentum)
    return torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay, betas=(0.9, 0.98))


def train_lm(model: torch.nn.Module, tokens: torch.Tensor, *, steps: int, lr: float, batch_size: int,
             seq_len: int, seed: int, warmup: int | None = None, optimizer: str = "adamw", momentum: float = 0.0,
             weight_decay: float = 0.0, device: torch.device | None = None,
             on_step: Callable[[int, float], None] | None = None, progress: ProgressFn | None = None,
             label: str = "training") -> list[float]:
    """Train the trainable parameters of a causal LM in place on random windows of ``tokens`` (warmup +
    cosine, gradient norm clipped at 1); returns the per-step losses. ``optimizer``: 'adamw' (betas 0.9, 0.98)
    or 'sgd' (with ``momentum``). ``device``: where the windows go (None: where ``tokens`` are).
    ``on_step(step, loss)`` runs after each update. Same seed, same windows, same result."""
    gen = torch.Generator().manual_seed(seed)
    params = [p for p in model.parameters() if p.requires_grad]
    opt = _optimizer(params, optimizer, lr, momentum, weight_decay)
    warmup = warmup if warmup is not None else max(1, steps // 20)
    model.train()
    losses: list[float] = []
    try:
        for step in range(steps):
            for g in opt.param_groups:
                g["lr"] = lr_at(step, steps, lr, warmup)
            x = random_windows(tokens, batch_size, seq_len, gen)
            x = x.to(device) if device is not None else x
            loss = model(input_ids=x, labels=x).loss
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(params, 1.0)
            opt.step()
            losses.append(loss.item())
            if on_step is not None:
                on_step(step + 1, losses[-1])
            report(progress, label, step + 1, steps)
    finally:
        model.eval()
    return losses
