"""Hooks that capture each refit layer's input and output (or its BatchNorm's output) during a forward pass."""
from __future__ import annotations

from contextlib import contextmanager

import torch
from torch import nn

from .spec import Layer


def features(x: torch.Tensor, conv: bool) -> torch.Tensor:
    """(N, C) view of an activation: channels last, every position a sample."""
    return (x.movedim(1, -1) if conv else x).reshape(-1, x.shape[1] if conv else x.shape[-1])


class _Captured(Exception):
    """Raised by a capture hook to end a forward pass once everything asked for is recorded."""


@contextmanager
def capture(model: nn.Module, layers: list[Layer], raw: bool = False, stop: bool = False):
    """Yield a dict filled on each forward: layer -> (input, target output) as (N, C) features,
    or as raw tensors (``raw=True``, needed to unfold conv inputs). With ``stop`` (one layer) the
    forward pass ends as soon as that layer's target is recorded: nothing after it is computed."""
    if stop and len(layers) != 1:
        raise ValueError("capture(stop=True) takes exactly one layer")
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
            if stop and not has_norm:
                raise _Captured

        handles.append(mod.register_forward_hook(hook))
        if layer.norm is not None:
            def norm_hook(_m, _args, out, name=layer.module, conv=conv):
                store[name][1] = out.detach() if raw else features(out.detach(), conv)
                if stop:
                    raise _Captured
            handles.append(mods[layer.norm].register_forward_hook(norm_hook))
    try:
        yield store
    finally:
        for h in handles:
            h.remove()


def stopped(fn, *args, **kwargs):
    """``fn(*args, **kwargs)``, or None when a ``stop`` capture ended the pass."""
    try:
        return fn(*args, **kwargs)
    except _Captured:
        return None


def forward(model: nn.Module, batch) -> torch.Tensor | None:
    """The model's output (logits for transformers models); None when a ``stop`` capture ended the pass."""
    out = stopped(model, batch)
    return out.logits if hasattr(out, "logits") else out
