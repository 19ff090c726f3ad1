"""Masks that sparsify task vectors δ = θ − θ_base before they are merged.

TIES trimming (Yadav et al. 2023, arXiv 2306.01708), DARE drop-and-rescale (Yu et al. 2023,
arXiv 2311.03099) and the Model Breadcrumbs band mask (Davari & Belilovsky 2023, arXiv 2312.06795).
Thresholds are exact order statistics found by selection (np.partition / torch.kthvalue), never a sort.
"""
from __future__ import annotations

import numpy as np
import torch

L1_EPS = 1e-7


def kth_smallest(values: torch.Tensor, k: int, dim: int | None = None) -> torch.Tensor:
    """The k-th smallest entry (1-based) of ``values`` (flattened, or along ``dim`` keeping it)."""
    if values.device.type == "cpu":
        a = values.detach().numpy()
        if dim is None:
            return torch.tensor(np.partition(a.reshape(-1), k - 1)[k - 1], dtype=values.dtype)
        return torch.from_numpy(np.take(np.partition(a, k - 1, axis=dim), [k - 1], axis=dim))
    if dim is None:
        return values.reshape(-1).kthvalue(k).values
    return values.kthvalue(k, dim=dim, keepdim=True).values


def l1_rescaled(delta: torch.Tensor, kept: torch.Tensor) -> torch.Tensor:
    """Scale the masked delta so its L1 norm matches the unmasked one (mergekit's ``rescale``)."""
    before, after = delta.abs().sum(), kept.abs().sum()
    if before < L1_EPS or after < L1_EPS:
        return kept
    return kept * (before / after)


def ties_trim(delta: torch.Tensor, density: float, rescale: str | None = None, inplace: bool = False,
              mergekit: bool = False) -> torch.Tensor:
    """Keep exactly the top ``density`` fraction of |δ| over the whole tensor (at least one entry).

    Equal magnitudes straddling the threshold are kept in index order, or as torch's sort orders
    them when ``mergekit`` (its choice there is arbitrary; following it reproduces its output).
    """
    if density >= 1:
        return delta
    if density <= 0 or delta.numel() == 0:
        return delta.zero_() if inplace else torch.zeros_like(delta)
    n = delta.numel()
    k = max(1, int(density * n))
    if k == n:
        return delta
    threshold, tie = _top_k_threshold(delta, k)
    mag = delta.abs()
    if not tie:
        mask = mag >= threshold
    elif mergekit:
        mask = _sorted_band(mag, 0, k, descending=True)
    else:
        mask = mag > threshold
        tied = (mag.reshape(-1) == threshold).nonzero().squeeze(1)
        mask.reshape(-1)[tied[: k - int(mask.sum())]] = True
    del mag
    if rescale == "l1":
        return l1_rescaled(delta, delta * mask)
    return delta.mul_(mask) if inplace else delta * mask


def _top_k_threshold(delta: torch.Tensor, k: int) -> tuple[torch.Tensor, bool]:
    """The k-th largest |δ| and whether an equal magnitude also sits just below it (a tie at the cut).

    On CPU one in-place np.partition of a scratch |δ| does it; the scratch is freed before returning.
    """
    n = delta.numel()
    if delta.device.type == "cpu":
        scratch = delta.detach().abs().reshape(-1).numpy()
        scratch.partition(n - k)
        threshold = scratch[n - k]
        tie = n > k and scratch[: n - k].max() == threshold
        return torch.tensor(threshold, dtype=delta.dtype), bool(tie)
    mag = delta.abs().reshape(-1)
    threshold = mag.kthvalue(n - k + 1).values
    return threshold, int((mag >= threshold).sum()) != k


def dare_drop(delta: torch.Tensor, density: float, rescale: str | None, generator: torch.Generator | None) -> torch.Tensor:
    """Keep each entry with probability ``density``; survivors scaled by 1/density ('paper') or to match L1 ('l1')."""
    if density >= 1:
        return delta
    if density <= 0:
        return torch.zeros_like(delta)
    keep = torch.rand(delta.shape, generator=generator, device=generator.device if generator else delta.device)
    kept = delta * (keep.to(delta.device) < density)
    if rescale == "paper":
        return kept / density
    if rescale == "l1":
        return l1_rescaled(delta, kept)
    return kept


def breadcrumbs_mask(delta: torch.Tensor, density: float, gamma: float, per_row: bool = True,
                     mergekit: bool = False) -> torch.Tensor:
    """Band mask: drop the top ``gamma`` fraction of |δ| (outliers) and everything below the next ``density``.

    ``per_row`` takes the fractions along the last dimension as the paper's reference code does;
    otherwise over the whole tensor as mergekit does. Outside ``mergekit`` mode at least one entry
    per row survives when ``density`` > 0, so tiny tensors and γ = 0 keep their band.
    """
    if density >= 1:
        return torch.ones_like(delta, dtype=torch.bool)
    mag = delta.abs()
    if per_row and delta.dim() >= 1 and not mergekit:
        mag = mag.reshape(-1, delta.shape[-1]) if delta.dim() > 1 else mag.reshape(1, -1)
        dim = 1
    else:
        mag = mag.reshape(1, -1)
        dim = None
    n = mag.shape[1]
    if n == 0 or density <= 0:
        return torch.zeros_like(delta, dtype=torch.bool)
    n_keep = int(density * n)
    n_top = int(gamma * n)
    if not mergekit:
        n_keep = max(1, n_keep)
        n_top = min(n_top, n - n_keep)
    n_bot = max(0, n - n_keep - n_top)
    if n_keep == 0:
        return torch.zeros_like(delta, dtype=torch.bool)
    lo = kth_smallest(mag, n_bot + 1, dim).to(delta.device)
    hi = kth_smallest(mag, n_bot + n_keep, dim).to(delta.device)
    mask = (mag >= lo) & (mag <= hi)
    if mergekit and int(mask.sum()) != n_keep:
        mask = _sorted_band(mag.reshape(-1), n_bot, n_keep, descending=False)
    return mask.reshape(delta.shape)


def _sorted_band(mag: torch.Tensor, start: int, count: int, descending: bool) -> torch.Tensor:
    """Exactly ``count`` entries from rank ``start`` on, ties ordered as torch's sort orders them.

    Only reached when equal magnitudes straddle a threshold: there the choice is arbitrary, and
    following torch's sort keeps the result identical to mergekit's.
    """
    flat = mag.reshape(-1)
    order = torch.sort(flat.float(), descending=descending).indices[start:start + count]
    mask = torch.zeros(flat.numel(), dtype=torch.bool, device=mag.device)
    mask[order] = True
    return mask.reshape(mag.shape)


def ties_elect_sign(weighted: torch.Tensor) -> torch.Tensor:
    """Elected sign per entry: sign of the summed (weighted, trimmed) deltas; a zero sum elects +."""
    return torch.where(weighted.sum(dim=0) >= 0, 1.0, -1.0).to(weighted.dtype)


def ties_agree(weighted: torch.Tensor) -> torch.Tensor:
    """Mask of the entries whose sign equals the elected sign (zeros never agree)."""
    return weighted.sign() == ties_elect_sign(weighted)
