"""The task-vector merges under ``compat: mergekit`` in bfloat16/float16, by the native kernels.

mergekit does this arithmetic in the recipe's dtype with whole-tensor torch ops (``reference`` writes
them out); here the same rounding, op for op, runs in one fused pass per tensor (``kernels.half_mix``),
bit-equal to the reference and without its full-size temporaries (deltas, float32 sort keys and masks
of every input, stacked chunks):

1. per input, one pass over θᵢ and θ_base counts |δᵢ| = |round(θᵢ − θ_base)| by its 15 magnitude bits
   (a half has only 32768 magnitudes), which gives the sort's cut exactly: the values at the first and
   last kept rank and how many lie before them; it also writes those 16 bits as sort keys (non-negative
   halves order as their bits);
2. where equal magnitudes straddle a cut (nearly always in half precision), mergekit keeps those its
   unstable sort puts first: ``kernels.sort_ties`` replays that order on the keys (a real sort where the
   replay does not agree with this torch), and the kept tied positions are listed;
3. one pass merges: trim, × weight, sign election, disjoint mean, ÷, × λ, + base, each rounded where
   torch's op in the dtype rounds.

Each function returns None where it does not apply (no kernels, not a half dtype, an L1 rescale, 16 or
more inputs: torch sums those in a cascade; non-finite magnitudes), and ``reference`` then runs instead.
"""
from __future__ import annotations

import math
import queue
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import torch

from . import mixing
from ..methods import reference as ref
from .sparsify import _replay_agrees

HALF = {torch.bfloat16: "bfloat16", torch.float16: "float16"}
NONFINITE = {"bfloat16": 0x7F80, "float16": 0x7C00}  # magnitude bits from which a value is inf or NaN
MAX_INPUTS = 15  # torch adds up to 15 rows one after another; more go through its cascade sum
BINS = 1 << 15


def _kernels(tensors: list[torch.Tensor], base: torch.Tensor):
    dtype = base.dtype
    if dtype not in HALF or base.device.type != "cpu" or not 0 < len(tensors) <= MAX_INPUTS:
        return None
    if any(t.dtype != dtype or t.shape != base.shape or t.device.type != "cpu" for t in tensors):
        return None
    return mixing.native_kernels()


def _bits(t: torch.Tensor) -> np.ndarray:
    """A half tensor's 16-bit patterns as a flat, contiguous uint16 array (a view when it can be)."""
    return np.ascontiguousarray(t.detach().reshape(-1).view(torch.int16).numpy()).view(np.uint16)


def _histogram(kernels, x: np.ndarray, b: np.ndarray, dtype: str, keys: np.ndarray, parallel: bool) -> np.ndarray:
    parts: list[np.ndarray] = []

    def count(lo: int, hi: int) -> None:
        part = np.zeros(BINS, dtype=np.int64)
        kernels.half_keys(x, b, dtype, lo, hi, keys, part)
        parts.append(part)

    mixing.parallel_ranges(x.size, count, None if parallel else 1)
    return np.sum(parts, axis=0) if parts else np.zeros(BINS, dtype=np.int64)


def _rank(order: np.ndarray, cum: np.ndarray, rank: int) -> tuple[int, int]:
    """The bin (in sort order) holding 0-based ``rank``, and how many entries sort before that bin."""
    i = int(np.searchsorted(cum, rank, side="right"))
    return i, int(cum[i - 1]) if i else 0


def _sorted_ties(kernels, keys: np.ndarray, dtype: str, descending: bool, values: list[int],
                 remake: Callable[[], np.ndarray], index: np.ndarray | None, count: int,
                 cuts: tuple[int, int]) -> list[np.ndarray]:
    """For each value (16-bit magnitude), the flat indices of the keys equal to it in the order torch's sort
    of the magnitudes (as floats, as mergekit sorts them) leaves them, as far as a split of the sorted keys at
    ``cuts`` can tell. ``keys`` is scratch; ``remake()`` writes them again for a real sort where the replay
    cannot tell; ``count``: how many keys hold the values."""
    lean = keys.size > ref.PARALLEL_LIMIT  # large tensors: no index array (cuts run side by side)
    ties = (kernels.sort_ties(keys, descending, values, owned=True, keep_keys=False, index=index, count=count,
                              lean=lean, cuts=cuts) if _replay16_agrees(kernels) else None)
    if ties is None:
        keys = remake()
        floats = torch.from_numpy(keys.view(np.int16)).view(HALF_TYPES[dtype]).float()
        order = torch.sort(floats, descending=descending).indices.numpy()
        ties = [order[keys[order] == v] for v in values]
    return ties


HALF_TYPES = {name: t for t, name in HALF.items()}
_AGREES: dict[str, bool] = {}


def _replay16_agrees(kernels) -> bool:
    """Whether the replay on 16-bit keys gives this torch's sort order of tied float keys (checked once on a
    small tensor full of ties, both directions); if not, ``_sorted_ties`` sorts."""
    if "ok" not in _AGREES:
        x = torch.randint(0, 40, (20_000,), generator=torch.Generator().manual_seed(0)).float()
        bits = x.to(torch.bfloat16).view(torch.int16).numpy().view(np.uint16)
        picks = [int(bits[x == v][0]) for v in (7.0, 23.0)]
        ok = True
        for desc in (True, False):
            order = torch.sort(x, descending=desc).indices.numpy()
            got = kernels.sort_ties(bits, desc, picks)
            ok = ok and got is not None and all(np.array_equal(order[x.numpy()[order] == v], t)
                                                for v, t in zip((7.0, 23.0), got))
        _AGREES["ok"] = ok and _replay_agrees(kernels)
    return _AGREES["ok"]


class Scratch:
    """Key and index buffers reused from one input to the next, and from one tensor to the next through
    ``mixing.borrow_scratch`` (fresh memory costs a page fault and a zeroed page every 4 KB)."""

    def __init__(self, n: int):
        self.n, self.keys, self.index = n, None, None

    def take(self) -> tuple[np.ndarray, np.ndarray]:
        if self.keys is None or self.keys.size < self.n:
            self.keys, self.index = None, None  # the old buffers go before the larger ones come
            self.keys, self.index = np.empty(self.n, dtype=np.uint16), np.empty(self.n, dtype=np.int32)
        return self.keys[:self.n], self.index[:self.n]


def _borrow(n: int) -> Scratch:
    s = mixing.borrow_scratch(lambda: Scratch(n))
    s.n = n
    return s


def band(kernels, x: np.ndarray, b: np.ndarray, dtype: str, start: int, count: int, descending: bool,
         parallel: bool = True, scratch: Scratch | None = None) -> tuple[float, float, np.ndarray] | None:
    """The entries of ranks [start, start + count) of mergekit's sort of |round(x − b)| (descending or not),
    as ``half_mix`` takes them: (lower, upper, listed); None for a non-finite magnitude."""
    n = x.size
    count = max(0, min(count, n - start))
    if count == 0:
        return math.inf, math.inf, np.empty(0, dtype=np.int64)
    keys, index = (scratch or Scratch(n)).take()
    counts = _histogram(kernels, x, b, dtype, keys, parallel)
    if counts[NONFINITE[dtype]:].any():
        return None
    order = counts[::-1] if descending else counts
    cum = np.cumsum(order)
    (first, before_first), (last, before_last) = _rank(order, cum, start), _rank(order, cum, start + count - 1)
    bins = [BINS - 1 - first, BINS - 1 - last] if descending else [first, last]
    ends = [np.float32(v) for v in torch.tensor(bins, dtype=torch.int16).view(HALF_TYPES[dtype]).float().tolist()]
    head_from, tail_to = start - before_first, start + count - before_last  # kept ranks among each end's ties
    if first == last:  # one run of equal magnitudes holds the whole band
        partial = [head_from > 0 or tail_to < order[first]] * 2
        wanted = [(bins[0], head_from, tail_to)]
    else:
        partial = [head_from > 0, tail_to < order[last]]
        wanted = [e for e, p in zip([(bins[0], head_from, None), (bins[1], 0, tail_to)], partial) if p]
    listed = []
    if wanted:
        def remake() -> np.ndarray:
            _histogram(kernels, x, b, dtype, keys, parallel)
            return keys
        values = [v for v, _, _ in wanted]
        ties = _sorted_ties(kernels, keys, dtype, descending, values, remake, index,
                            sum(int(counts[v]) for v in set(values)), (start, start + count))
        listed = [t[a:z] for t, (_, a, z) in zip(ties, wanted)]
    del keys
    # the band's first end is its upper bound in a descending sort; an end whose ties are all kept moves just
    # past its value, so that none of them needs listing
    (lo, lo_partial), (hi, hi_partial) = sorted(zip(ends, partial), key=lambda e: e[0]) if first != last else \
        ((ends[0], partial[0]), (ends[0], partial[0]))
    lo = lo if lo_partial else np.nextafter(lo, np.float32(-np.inf))
    hi = hi if hi_partial else np.nextafter(hi, np.float32(np.inf))
    kept = np.sort(np.concatenate(listed)) if listed else np.empty(0, dtype=np.int64)
    return float(lo), float(hi), kept.astype(np.int64)


def task_merge(tensors, base, weight, cut: Callable | None, consensus: bool, normalize: bool, lambda_: float,
               inplace: bool = False, sparsify: Callable | None = None) -> torch.Tensor | None:
    """``reference.task_merge`` by the kernels; ``cut(kernels, x, b, dtype, i, parallel, scratch)`` gives input i's
    (lower, upper, listed) or None. ``sparsify(δ, i)`` instead sparsifies each δᵢ = θᵢ − θ_base with torch, as the
    reference does (DARE's draws), and the kernels merge the results. None where the kernels do not apply."""
    kernels = _kernels(tensors, base)
    if kernels is None:
        return None
    dtype = HALF[base.dtype]
    if sparsify is not None:
        if not all(torch.isfinite(t).all() for t in (base, *tensors)):
            return None
        tensors = _sparsified(tensors, base, sparsify)
    xs = [_bits(t) for t in tensors]
    b = _bits(base)
    n = b.size
    keep_all = (-1.0, math.inf, np.empty(0, dtype=np.int64))
    cuts = [keep_all] * len(xs) if cut is None else _cuts(kernels, xs, b, dtype, cut)
    if cuts is None:
        return None
    w = torch.tensor(weight, dtype=base.dtype)
    divisor = w.sum(dim=0, keepdim=True)
    divisor[divisor.abs() < 1e-8] = 1
    out = base if inplace and base.is_contiguous() else torch.empty_like(base, memory_format=torch.contiguous_format)
    o = _bits(out)
    lower = np.array([c[0] for c in cuts], dtype=np.float32)
    upper = np.array([c[1] for c in cuts], dtype=np.float32)
    listed = [c[2] for c in cuts]
    is_delta = np.full(len(xs), sparsify is not None, dtype=np.bool_)
    args = (is_delta, b, o, dtype, lower, upper, listed)
    flags = (w.float().numpy(), consensus, normalize, float(divisor), np.float32(lambda_))

    def mix(lo: int, hi: int) -> None:
        start = np.array([np.searchsorted(a, lo) for a in listed], dtype=np.int64)
        kernels.half_mix(xs, *args, start, *flags, lo, hi)
    mixing.parallel_ranges(n, mix)
    return out


def _cuts(kernels, xs: list[np.ndarray], b: np.ndarray, dtype: str, cut: Callable) -> list | None:
    """Every input's cut, one input per core (the replay of a sort is sequential); a single input spreads its
    counting pass over the cores instead. Each concurrent cut holds 2 bytes a key and an index array of 4
    (large tensors: 16 bytes a tied key instead, while under a quarter of the keys are tied). None if any
    input has a non-finite magnitude."""
    n = b.size
    workers = min(len(xs), mixing.worker_count(n * len(xs)))
    alone = workers == 1
    scratch = queue.SimpleQueue()
    mine = [_borrow(n) for _ in range(workers)]
    for s in mine:
        scratch.put(s)
    cuts: list = [None] * len(xs)

    def fill(i: int) -> None:
        own = scratch.get()
        cuts[i] = cut(kernels, xs[i], b, dtype, i, alone, own)
        scratch.put(own)
    try:
        with ThreadPoolExecutor(workers) as pool:
            list(pool.map(fill, range(len(xs))))
    finally:
        for s in mine:
            mixing.give_back_scratch(s)
    return None if any(c is None for c in cuts) else cuts


def _sparsified(tensors, base, sparsify: Callable) -> list[torch.Tensor]:
    """δᵢ = θᵢ − θ_base sparsified in torch, in place of each θᵢ, as ``reference.task_merge`` does it (one input
    at a time: the draws' temporaries are as large as the tensor)."""
    return [sparsify(t.sub_(base), i).contiguous() for i, t in enumerate(tensors)]


def _top(density: list[float]):
    def cut(kernels, x, b, dtype, i, parallel, scratch):
        n, d = x.size, density[i]
        if d >= 1:
            return -1.0, math.inf, np.empty(0, dtype=np.int64)
        if d <= 0 or n == 0:
            return math.inf, math.inf, np.empty(0, dtype=np.int64)
        return band(kernels, x, b, dtype, 0, max(1, int(d * n)), True, parallel, scratch)
    return cut


def _outliers(density: list[float], gamma: list[float]):
    def cut(kernels, x, b, dtype, i, parallel, scratch):
        n = x.size
        if density[i] >= 1:
            return -1.0, math.inf, np.empty(0, dtype=np.int64)
        keep, top = int(density[i] * n), int(gamma[i] * n)
        return band(kernels, x, b, dtype, max(0, n - keep - top), keep, False, parallel, scratch)
    return cut


def _plain(rescale) -> bool:
    return rescale in (None, False, "none")


def task_arithmetic(tensors, base, weight, normalize=False, lambda_=1.0, inplace=False, **kw):
    fast = task_merge(tensors, base, weight, None, False, normalize, lambda_, inplace)
    return fast if fast is not None else ref.task_arithmetic(tensors, base, weight, normalize, lambda_, **kw)


def _at_least(threshold: list[float]):
    """``trim: model``: keep |δ| >= each input's whole-model threshold (−1 keeps all, inf none)."""
    def cut(kernels, x, b, dtype, i, parallel, scratch):
        return float(np.nextafter(np.float32(threshold[i]), np.float32(-np.inf))), math.inf, np.empty(0, dtype=np.int64)
    return cut


def ties(tensors, base, weight, density, normalize=True, lambda_=1.0, rescale=None, inplace=False, threshold=None,
         **kw):
    cut = _top(density) if threshold is None else _at_least(threshold)
    fast = task_merge(tensors, base, weight, cut, True, normalize, lambda_, inplace) if _plain(rescale) else None
    return fast if fast is not None else ref.ties(tensors, base, weight, density, normalize, lambda_, rescale,
                                                  threshold=threshold, **kw)


def _breadcrumbs(consensus: bool):
    plain = ref.breadcrumbs_ties if consensus else ref.breadcrumbs

    def breadcrumbs(tensors, base, weight, density, gamma, normalize=False, lambda_=1.0, rescale=None, inplace=False,
                    **kw):
        fast = (task_merge(tensors, base, weight, _outliers(density, gamma), consensus, normalize, lambda_, inplace)
                if _plain(rescale) else None)
        return fast if fast is not None else plain(tensors, base, weight, density, gamma, normalize, lambda_, rescale,
                                                   **kw)
    return breadcrumbs


breadcrumbs = _breadcrumbs(False)
breadcrumbs_ties = _breadcrumbs(True)


def _dare(consensus: bool):
    plain = ref.dare_ties if consensus else ref.dare_linear

    def dare(tensors, base, weight, density, normalize=False, lambda_=1.0, rescale="l1", generators=None,
             inplace=False, **kw):
        gens = generators or [None] * len(tensors)

        def drop(d: torch.Tensor, i: int) -> torch.Tensor:
            return ref.bernoulli(d, density[i], ref._rescale(rescale), gens[i])
        fast = task_merge(tensors, base, weight, None, consensus, normalize, lambda_, inplace, sparsify=drop)
        return fast if fast is not None else plain(tensors, base, weight, density, normalize, lambda_, rescale,
                                                   generators, **kw)
    return dare


dare_linear = _dare(False)
dare_ties = _dare(True)
