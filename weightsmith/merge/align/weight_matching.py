"""Git Re-Basin weight matching (Ainsworth et al. 2022): data-free permutation alignment of B onto A.

Coordinate descent over groups; each step solves one linear assignment on Σ W_A P W_Bᵀ over the group's
tensors (scipy ``linear_sum_assignment``); stops when a whole sweep gains nothing. A group whose neighbours'
permutations are unchanged since it was last solved has the same cost matrix, hence the same answer: it is skipped.
"""
from __future__ import annotations

from collections.abc import Mapping

import numpy as np
import torch
from scipy.optimize import linear_sum_assignment

from ...progress import ProgressFn, report
from .apply import identity_perms, permute_tensor
from .spec import PermSpec


def _units(t: torch.Tensor, dim: int, n: int) -> torch.Tensor:
    return t.movedim(dim, 0).reshape(n, -1)


def _cost(spec: PermSpec, g: str, members, state_a: Mapping, state_b: Mapping, perms, dt, device) -> torch.Tensor:
    """Σ W_A P(W_B)ᵀ over the group's tensors, each read and upcast only while it is used."""
    n = spec.groups[g].size
    cost = torch.zeros(n, n, dtype=dt, device=device)
    for name, ax in members:
        wa = state_a[name].to(device, dt)
        # permuted in the stored dtype: the same values, a quarter of the bytes moved when that is bfloat16
        wb = permute_tensor(state_b[name].to(device), spec.axes[name], perms, skip=g).to(dt)
        cost.addmm_(_units(wa, ax.dim, n), _units(wb, ax.dim, n).T)
        del wa, wb
    return cost


def _improve(spec: PermSpec, g: str, members, state_a: Mapping, state_b: Mapping, perms, dt, device) -> bool:
    """Solve group ``g``'s assignment; take it (and say so) when it beats the current permutation."""
    n = spec.groups[g].size
    c = _cost(spec, g, members, state_a, state_b, perms, dt, device).cpu().numpy()
    _, cols = linear_sum_assignment(c, maximize=True)
    old = c[np.arange(n), perms[g].cpu().numpy()].sum()
    new = c[np.arange(n), cols].sum()
    if new > old + 1e-12 * max(1.0, abs(old)):
        perms[g] = torch.as_tensor(cols, device=device)
        return True
    return False


@torch.no_grad()
def weight_matching(spec: PermSpec, state_a: Mapping[str, torch.Tensor], state_b: Mapping[str, torch.Tensor], *,
                    max_sweeps: int = 100, seed: int = 0, device: str | torch.device = "cpu",
                    progress: ProgressFn | None = None) -> dict[str, torch.Tensor]:
    """Permutations of B's groups maximising Σ ⟨W_A, P(W_B)⟩ over all tensors in ``spec``.

    The states may be lazy (``Checkpoint.lazy``): a tensor is looked up when its group is matched and upcast
    alone, so besides one group's tensors and its cost matrix nothing the size of a model is held."""
    dt = torch.float64 if torch.device(device).type == "cpu" else torch.float32
    perms = identity_perms(spec, device)
    members = {g: spec.tensors_of(g) for g in spec.groups}
    neighbours = {g: sorted({ax.group for name, _ in members[g] for ax in spec.axes[name]} - {g}) for g in spec.groups}
    changes = dict.fromkeys(spec.groups, 0)  # how often each group's permutation changed
    solved_at: dict[str, list[int]] = {}  # the neighbours' change counts when the group was last solved
    rng = np.random.default_rng(seed)
    names = list(spec.groups)
    for sweep in range(max_sweeps):
        gained = False
        for g in rng.permutation(names):
            seen = [changes[h] for h in neighbours[g]]
            if solved_at.get(g) == seen:
                continue
            solved_at[g] = seen
            if _improve(spec, g, members[g], state_a, state_b, perms, dt, device):
                changes[g] += 1
                gained = True
        report(progress, "weight matching sweeps", sweep + 1, None)
        if not gained:
            break
    return {g: p.cpu() for g, p in perms.items()}
