"""Applying a permutation per group to a state dict or a module: B's units reordered into A's basis.

``perms[group][i] = j`` means unit i of the aligned model is unit j of the original one.
"""
from __future__ import annotations

import torch
from torch import nn

from .spec import Axis, PermSpec


def unit_index(perm: torch.Tensor, block: int) -> torch.Tensor:
    """Entry indices for a unit permutation over units of ``block`` consecutive entries."""
    if block == 1:
        return perm
    return (perm[:, None] * block + torch.arange(block, device=perm.device)).reshape(-1)


def permute_tensor(t: torch.Tensor, axes: list[Axis], perms: dict[str, torch.Tensor], skip: str | None = None) -> torch.Tensor:
    for ax in axes:
        if ax.group == skip or ax.group not in perms:
            continue
        t = t.index_select(ax.dim, unit_index(perms[ax.group].to(t.device), ax.block))
    return t


def apply_permutation(state: dict[str, torch.Tensor], spec: PermSpec, perms: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """A new state dict with every tensor named in ``spec`` permuted; other entries unchanged."""
    return {k: permute_tensor(v, spec.axes[k], perms) if k in spec.axes else v for k, v in state.items()}


@torch.no_grad()
def permute_module(model: nn.Module, spec: PermSpec, perms: dict[str, torch.Tensor]) -> nn.Module:
    """Permute ``model`` in place (parameters and buffers); it computes the same function afterwards."""
    seen: set[int] = set()  # tied tensors (embeddings shared with lm_head) are permuted once
    for name, t in list(model.named_parameters(remove_duplicate=False)) + list(model.named_buffers()):
        if name in spec.axes and id(t) not in seen:
            seen.add(id(t))
            t.data = permute_tensor(t.data, spec.axes[name], perms).contiguous()
    return model


def identity_perms(spec: PermSpec, device: str | torch.device = "cpu") -> dict[str, torch.Tensor]:
    return {g: torch.arange(grp.size, device=device) for g, grp in spec.groups.items()}


def random_perms(spec: PermSpec, seed: int = 0) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    return {g: torch.randperm(grp.size, generator=gen) for g, grp in spec.groups.items()}


def invert(perm: torch.Tensor) -> torch.Tensor:
    inv = torch.empty_like(perm)
    inv[perm] = torch.arange(len(perm), device=perm.device)
    return inv
