"""Hooks that capture each refit layer's input and output (or its BatchNorm's output) during a forward pass."""
from __future__ import annotations

from contextlib import contextmanager

import torch
from torch import nn

from .spec import Layer


def features(x: torch.Tensor, conv: bool) -> torch.Tensor:
    """(N, C) view of an activation: channels last, every position a sample."""
    return (x.movedim(1, -1) if conv else x).reshape(-1, x.shape[1] if conv else x.shape[-1])


@contextmanager
def capture(model: nn.Module, layers: list[Layer], raw: bool = False):
    """Yield a dict filled on each forward: layer -> (input, target output) as (N, C) features,
    or as raw tensors (``raw=True``, needed to unfold conv inputs)."""
    mods = dict(model.named_modules())
    store: dict[str, list] = {}
    handles = []
    for layer in layers:
        mod = mods[layer.module]
        conv = isinstance(mod, nn.Conv2d)

        def hook(_m, args, out, name=layer.module, conv=conv, has_norm=layer.norm is not None):
            x = args[0].detach()
            store[name] = [x if raw else features(x, conv), None if has_norm else
                           (out.detach() if raw else features(out.detach(), conv))]

        handles.append(mod.register_forward_hook(hook))
        if layer.norm is not None:
            def norm_hook(_m, _args, out, name=layer.module, conv=conv):
                store[name][1] = out.detach() if raw else features(out.detach(), conv)
            handles.append(mods[layer.norm].register_forward_hook(norm_hook))
    try:
        yield store
    finally:
        for h in handles:
            h.remove()


def forward(model: nn.Module, batch) -> torch.Tensor:
    out = model(batch)
    return out.logits if hasattr(out, "logits") else out
