"""Healing and training of RPS models: a causal-LM loop over a token stream on any device.

The index maps are cached for the duration (so each step does not re-hash) and dropped after,
so a healed model is as small in memory as a loaded one.
"""
from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

from ..device import resolve_device
from ..progress import ProgressFn, report
from ..zoo.train import lr_at, random_windows
from .memory import HashedMemory


def fit(model: nn.Module, tokens: torch.Tensor, *, steps: int, lr: float, batch: int, seq: int, seed: int,
        device: str | torch.device = "cpu", optimizer: str = "adamw", weight_decay: float = 0.0,
        after_step: Callable[[], None] | None = None, progress: ProgressFn | None = None,
        label: str = "healing") -> list[float]:
    """Train in place with warmup + cosine; returns per-step losses. ``after_step`` runs after each update."""
    dev = resolve_device(device)
    model.to(dev)
    memories = [m for m in model.modules() if isinstance(m, HashedMemory)]
    for mem in memories:
        mem.cache_index = True
    gen = torch.Generator().manual_seed(seed)
    params = [p for p in model.parameters() if p.requires_grad]
    if optimizer == "sgd":
        opt = torch.optim.SGD(params, lr=lr)
    else:
        opt = torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay, betas=(0.9, 0.98))
    warmup = max(1, steps // 20)
    model.train()
    losses: list[float] = []
    try:
        for step in range(steps):
            for g in opt.param_groups:
                g["lr"] = lr_at(step, steps, lr, warmup)
            x = random_windows(tokens, batch, seq, gen).to(dev)
            loss = model(input_ids=x, labels=x).loss
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(params, 1.0)
            opt.step()
            if after_step is not None:
                after_step()
            losses.append(loss.item())
            report(progress, label, step + 1, steps)
    finally:
        for mem in memories:
            mem.cache_index = False
            mem.clear_cache()
        model.eval()
    return losses
