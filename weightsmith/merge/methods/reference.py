"""Reference implementations: each method's arithmetic done the way mergekit 0.1.5 does it, in the
tensors' own dtype, written plainly (whole tensors, no kernels, no fusion).

They serve twice: the engine runs them under ``compat: mergekit`` when the recipe's ``dtype`` is a
half precision (mergekit computes in that dtype, so rounding changes which deltas survive a trim
and the sign election), and the tests check every fast path in ``methods`` against them.

What mergekit does, per family (read from its 0.1.5 sources, reimplemented here):

- task vectors: δᵢ = θᵢ − θ_base in the dtype; each δᵢ sparsified; stacked and multiplied by the
  weights (a tensor of that dtype); TIES sign election on Σ wᵢδᵢ (≥ 0 elects +), the kept
  weights' sum as divisor (0 → 1), else Σ wᵢ (|Σ| < 1e-8 → 1); ``/ divisor`` when normalizing,
  ``× λ`` when λ ≠ 1; ``base + mixed``.
- magnitude trim: the top ``max(1, int(density·n))`` of |δ| (sorted in float32 on CPU, ties in
  the order ``argsort`` leaves them); breadcrumbs: after the ``int(γ·n)`` largest, ``int(density·n)``
  entries of an ascending sort. Both pick their band with ``sparsify._sorted_band``, which gives
  exactly the sort's choice among ties without sorting (tested against ``torch.sort``). Rescale ``l1``: × (Σ|δ| / Σ|kept|) unless either is < 1e-7.
- DARE: a Bernoulli(density) mask drawn in the dtype (float32 for float16 on CPU), then the
  same rescale. Random: equal to mergekit in distribution, not draw for draw.
- linear and SLERP work in float32 and round the result to the dtype once; Model Stock works in
  the dtype throughout.
"""
from __future__ import annotations

import os
from concurrent.futures import ThreadPoolExecutor

import torch

from ..native.sparsify import _sorted_band

PARALLEL_LIMIT = 8 << 20  # task vectors of more entries are sparsified one input at a time
CHUNK = 1024 * 1024  # mergekit's SLERP reduces norms and dots over chunks of this many elements


def _rescaled(delta: torch.Tensor, mask: torch.Tensor, rescale: str | None, eps: float = 1e-7) -> torch.Tensor:
    """delta · mask, L1-rescaled for 'l1'; ``delta`` is the caller's scratch and is overwritten."""
    before = delta.abs().sum() if rescale == "l1" else None
    kept = delta.mul_(mask)
    if rescale != "l1":
        return kept
    after = kept.abs().sum()
    if before < eps or after < eps:
        return kept
    return kept * (before / after)


def _band_mask(delta: torch.Tensor, start: int, count: int, descending: bool) -> torch.Tensor:
    """mergekit's sort of |δ| (float32 on CPU) cut to ranks [start, start + count), as a bool mask
    (δ·mask then gives mergekit's δ·mask in δ's dtype, −0.0 included)."""
    key = delta.abs().reshape(-1)  # a fresh tensor: the band search may use it as scratch
    key = key.float() if key.device.type == "cpu" else key
    return _sorted_band(key, start, count, descending, scratch=True).reshape_as(delta)


def magnitude(delta: torch.Tensor, density: float, rescale: str | None = None) -> torch.Tensor:
    if density >= 1:
        return delta
    n = delta.numel()
    if density <= 0 or n == 0:
        return torch.zeros_like(delta)
    return _rescaled(delta, _band_mask(delta, 0, max(1, int(density * n)), True), rescale)


def outliers(delta: torch.Tensor, density: float, gamma: float, rescale: str | None = None) -> torch.Tensor:
    if density >= 1:
        return delta
    n = delta.numel()
    keep, top = int(density * n), int(gamma * n)
    return _rescaled(delta, _band_mask(delta, max(0, n - keep - top), keep, False), rescale)


def bernoulli(delta: torch.Tensor, density: float, rescale: str | None, generator: torch.Generator | None):
    if density >= 1:
        return delta
    work = delta.dtype if (delta.device.type != "cpu" or delta.dtype == torch.bfloat16) else torch.float32
    mask = torch.bernoulli(torch.full_like(delta, density, dtype=work), generator=generator)
    return _rescaled(delta.to(work), mask, rescale).to(delta.dtype)


def task_merge(tensors, base, weight, sparsify, consensus: bool, normalize: bool, lambda_: float) -> torch.Tensor:
    """θ_base + λ·merge(sparsify(δᵢ)) in mergekit's order of operations, in the inputs' dtype.

    ``tensors`` are the caller's scratch (each becomes its δ). The election and sums are elementwise
    across the inputs, so they run over chunks of the flattened tensor (same bits, a chunk of scratch)."""
    deltas: list[torch.Tensor] = [None] * len(tensors)

    def fill(i: int) -> None:
        d = tensors[i].sub_(base)
        deltas[i] = (sparsify(d, i) if sparsify else d).reshape(-1)
    # the inputs are independent: sparsified side by side, one per core (their selections release the GIL),
    # except for tensors so large that one at a time keeps the peak memory down
    workers = 1 if base.numel() > PARALLEL_LIMIT else max(1, min(len(tensors), os.cpu_count() or 1))
    with ThreadPoolExecutor(workers) as pool:
        list(pool.map(fill, range(len(tensors))))
    w = torch.tensor(weight, dtype=base.dtype, device=base.device).reshape(-1, 1)
    flat_base = base.reshape(-1)
    out = torch.empty_like(flat_base)
    for s in range(0, flat_base.numel(), CHUNK):
        e = s + CHUNK
        d = torch.stack([x[s:e] for x in deltas])
        d.mul_(w)
        if consensus:
            majority = (d.sum(dim=0) >= 0).to(base.dtype) * 2 - 1
            mask = d.sign() == majority
            mixed = (d * mask).sum(dim=0)
            divisor = (w * mask).sum(dim=0)
            divisor[divisor == 0] = 1
        else:
            mixed = d.sum(dim=0)
            divisor = w.sum(dim=0)
            divisor[divisor.abs() < 1e-8] = 1
        if normalize:
            mixed /= divisor
        if lambda_ != 1:
            mixed *= lambda_
        out[s:e] = flat_base[s:e] + mixed
    return out.reshape(base.shape)


def _rescale(rescale) -> str | None:
    return "l1" if rescale in ("l1", True) else None


def task_arithmetic(tensors, base, weight, normalize=False, lambda_=1.0, **_):
    return task_merge(tensors, base, weight, None, False, normalize, lambda_)


def ties(tensors, base, weight, density, normalize=True, lambda_=1.0, rescale=None, threshold=None, **_):
    """``threshold``: each input's whole-model cut (``trim: model``, found by the engine's pre-pass), which
    keeps |δ| >= it (compared in float32) instead of each tensor's top ``density``."""
    if threshold is not None:
        return task_merge(tensors, base, weight, lambda d, i: _rescaled(d, d.abs().float() >= threshold[i],
                                                                        _rescale(rescale)), True, normalize, lambda_)
    return task_merge(tensors, base, weight, lambda d, i: magnitude(d, density[i], _rescale(rescale)),
                      True, normalize, lambda_)


def _breadcrumbs(consensus: bool):
    def breadcrumbs(tensors, base, weight, density, gamma, normalize=False, lambda_=1.0, rescale=None, **_):
        return task_merge(tensors, base, weight, lambda d, i: outliers(d, density[i], gamma[i], _rescale(rescale)),
                          consensus, normalize, lambda_)
    return breadcrumbs


breadcrumbs = _breadcrumbs(False)
breadcrumbs_ties = _breadcrumbs(True)


def _dare(consensus: bool):
    def dare(tensors, base, weight, density, normalize=False, lambda_=1.0, rescale="l1", generators=None, **_):
        gens = generators or [None] * len(tensors)
        return task_merge(tensors, base, weight, lambda d, i: bernoulli(d, density[i], _rescale(rescale), gens[i]),
                          consensus, normalize, lambda_)
    return dare


dare_linear = _dare(False)
dare_ties = _dare(True)


def linear(tensors, weight, normalize=True, **_):
    first = tensors[0]
    work = torch.float64 if first.dtype == torch.float64 else torch.float32
    w = torch.tensor(weight, dtype=work, device=first.device)
    out = torch.zeros_like(first, dtype=work)
    for x, c in zip(tensors, w.unbind(0)):
        out.addcmul_(x, c)
    if normalize:
        out.div_(w.sum())
    return out.to(first.dtype)


def slerp(tensors, base, t, dot_threshold=0.9995, eps=1e-8, **_):
    work = torch.float64 if base.dtype == torch.float64 else torch.float32
    a, b = base.reshape(1, -1), tensors[0].reshape(1, -1)
    tt = torch.tensor([[t]], dtype=work)
    if not a.shape[1]:
        return ((1 - tt) * a + tt * b).reshape(base.shape).to(base.dtype)
    spans = [(s, s + CHUNK) for s in range(0, a.shape[1], CHUNK)]
    na = torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(a[:, s:e].to(work), dim=1, keepdim=True)
                                               for s, e in spans]), dim=0)
    nb = torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(b[:, s:e].to(work), dim=1, keepdim=True)
                                               for s, e in spans]), dim=0)
    na = torch.where(na > eps, na, 1)
    nb = torch.where(nb > eps, nb, 1)
    dot = torch.stack([((a[:, s:e].to(work) / na) * (b[:, s:e].to(work) / nb)).sum(dim=1, keepdim=True)
                       for s, e in spans]).sum(dim=0).clamp(-1, 1)
    lin = dot.abs() > dot_threshold
    theta = torch.acos(torch.where(lin, 0, dot))
    sin = torch.sin(theta)
    ca = torch.where(lin, 1 - tt, torch.sin((1 - tt) * theta) / sin)
    cb = torch.where(lin, tt, torch.sin(tt * theta) / sin)
    out = torch.empty_like(a)
    for s, e in spans:
        out[:, s:e] = ca * a[:, s:e].to(work) + cb * b[:, s:e].to(work)
    return out.reshape(base.shape)
