"""Measured share init (``share_init="best"``): each group of a fold shares the weights of the member whose
weights, used by every block of the group, cost the least calibration loss.

Groups are settled one after another (the earlier ones at their choice, the later ones at their first
member's weights), each member tried in turn: sum of the group sizes forward passes over every other
calibration window. The loss is the removal probe's: the LM loss for causal LMs, 1 - cos of the pooled
sentence embedding to the original's for encoders.
"""
from __future__ import annotations

import torch

from ..progress import ProgressFn, report
from .blocks import block_list, is_causal_lm
from .format import shared_keys
from ..pooling import Pooling
from .removal import calibration_forward, window_loss


@torch.no_grad()
def calibration_loss(model: torch.nn.Module, windows: torch.Tensor, reference: list[torch.Tensor] | None, *,
                     batch_size: int, device, pooling: Pooling) -> float:
    """Mean calibration loss of ``model`` on ``windows``; encoders compare to the ``reference`` embeddings
    (one tensor a batch, from ``reference_embeddings``)."""
    model.eval()
    causal = reference is None
    total = 0.0
    for bi, s in enumerate(range(0, windows.shape[0], batch_size)):
        x = windows[s:s + batch_size].to(device)
        loss = window_loss(calibration_forward(model, x, causal), causal, pooling, None if causal else reference[bi])
        total += loss.item() * x.shape[0]
    return total / windows.shape[0]


@torch.no_grad()
def reference_embeddings(model: torch.nn.Module, windows: torch.Tensor, *, batch_size: int, device,
                         pooling: Pooling) -> list[torch.Tensor] | None:
    """The original encoder's pooled embeddings of each batch of ``windows`` (None for causal LMs)."""
    if is_causal_lm(model):
        return None
    model.eval()
    return [pooling(calibration_forward(model, windows[s:s + batch_size].to(device), False).last_hidden_state.float())
            for s in range(0, windows.shape[0], batch_size)]


@torch.no_grad()
def best_members(teacher: torch.nn.Module, folded: torch.nn.Module, kept: list[int], groups: list[list[int]],
                 windows: torch.Tensor, *, batch_size: int = 8, device="cpu", pooling: Pooling | None = None,
                 stride: int = 2, progress: ProgressFn | None = None) -> tuple[list[int], list[list[float]]]:
    """For each group, the position in the group of the member whose weights it should share, and the loss of
    each member tried. ``folded``: the fold with every group at its first member's weights (changed in place)."""
    if all(len(g) < 2 for g in groups):  # nothing shared: nothing to measure
        return [0] * len(groups), [[] for _ in groups]
    pooling = pooling or Pooling()
    windows = windows[::stride]
    reference = reference_embeddings(teacher, windows, batch_size=batch_size, device=device, pooling=pooling)
    original, new = block_list(teacher), block_list(folded)
    picks, losses = [], []
    done, total = 0, sum(len(g) for g in groups if len(g) > 1)
    for group in groups:
        if len(group) < 2:
            picks.append(0)
            losses.append([])
            continue
        tried = []
        for j in group:
            _take(new[group[0]], original[kept[j]])
            tried.append(calibration_loss(folded, windows, reference, batch_size=batch_size, device=device,
                                          pooling=pooling))
            done += 1
            report(progress, "share init", done, total)
        pick = min(range(len(group)), key=lambda i: (tried[i], i))
        _take(new[group[0]], original[kept[group[pick]]])
        picks.append(pick)
        losses.append([round(v, 6) for v in tried])
    return picks, losses


def _take(head: torch.nn.Module, source: torch.nn.Module) -> None:
    """Point a group's (tied) head block at ``source``'s shareable tensors (shared storage, no copy: the head
    may hold the teacher's own tensors, which a copy into it would change)."""
    for key in shared_keys(source):
        head.get_parameter(key).data = source.get_parameter(key).data
