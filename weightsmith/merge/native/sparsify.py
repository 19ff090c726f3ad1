"""Masks that sparsify task vectors δ = θ − θ_base before they are merged.

TIES trimming (Yadav et al. 2023, arXiv 2306.01708), DARE drop-and-rescale (Yu et al. 2023,
arXiv 2311.03099) and the Model Breadcrumbs band mask (Davari & Belilovsky 2023, arXiv 2312.06795).
Thresholds are exact order statistics found by selection (np.partition / torch.kthvalue) or, over a
whole model, by two histograms of the magnitudes' float32 bits; never by a sort.
"""
from __future__ import annotations

import math
from collections.abc import Callable, Iterable

import numpy as np
import torch

from . import mixing
from .mixing import Cutoff

L1_EPS = 1e-7
SAMPLE = 1 << 16  # at most this many magnitudes sampled to bracket a top-k threshold
BRACKETED = 1 << 20  # tensors with at least this many entries find their threshold from a sampled bracket


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


def ties_cutoff(x: torch.Tensor, base: torch.Tensor | None, density: float, mergekit: bool = False) -> Cutoff | None:
    """TIES trim of δ = x − base (or δ = x without a base) as a magnitude cutoff keeping exactly the top
    ``density`` fraction of |δ| over the whole tensor (at least one entry).

    Equal magnitudes straddling the threshold are kept in index order: ``tie_end`` marks where the
    last kept one sits. With ``mergekit`` such a tie returns None, since mergekit keeps the ones its
    sort happens to put first and only a sort reproduces that (``ties_trim`` does).
    """
    n = x.numel()
    k = kept_count(density, n)
    if k == n:
        return Cutoff(-1.0)
    if k == 0:
        return Cutoff(math.inf)
    threshold, above, equal = magnitude_rank(x, base, k)
    kept_ties = k - above
    tie = equal > kept_ties
    if not tie:
        return Cutoff(threshold)
    if mergekit:
        return None
    return Cutoff(threshold, _index_after(x, base, threshold, kept_ties))


HIGH_BINS, LOW_BINS = 1 << 15, 1 << 16  # a magnitude's float32 bits: top 16 (sign bit 0), low 16


def magnitude_histogram(x: torch.Tensor, base: torch.Tensor, high: int, counts: np.ndarray) -> None:
    """Add into ``counts`` the histogram of |x − base|'s float32 bits: by their top 16 bits when ``high`` < 0,
    else by their low 16 bits among the entries whose top 16 bits equal ``high``. Non-negative floats order
    as their bit patterns, so the two histograms pin an order statistic down exactly."""
    magnitude_histograms([x], base, [high], [counts])


def magnitude_histograms(xs: list[torch.Tensor], base: torch.Tensor, highs: list[int], counts: list[np.ndarray]) -> None:
    """``magnitude_histogram`` of several inputs against one base; the native kernel reads the base once."""
    bf = base.reshape(-1)
    flat = [x.reshape(-1) for x in xs]
    native = bf.device.type == "cpu" and all(t.dtype == torch.float32 for t in (bf, *flat))
    kernels = mixing.native_kernels() if native else None
    if kernels is not None:
        xa, ba = [mixing.flat_array(x) for x in flat], mixing.flat_array(bf)
        parts: list[list[np.ndarray]] = []

        def count(lo: int, hi: int) -> None:
            part = [np.zeros_like(c) for c in counts]
            kernels.magnitude_histograms(xa, ba, lo, hi, highs, part)
            parts.append(part)

        mixing.parallel_ranges(ba.size, count)
        for part in parts:
            for c, p in zip(counts, part):
                c += p
        return
    step = 1 << 22
    for xf, high, c in zip(flat, highs, counts):
        for s in range(0, xf.numel(), step):
            bits = (xf[s:s + step].float() - bf[s:s + step].float()).abs_().view(torch.int32)
            index = bits >> 16 if high < 0 else bits[(bits >> 16) == high] & 0xFFFF
            c += torch.bincount(index, minlength=c.size).cpu().numpy()


def _bin_of_rank(counts: np.ndarray, k: int) -> tuple[int, int]:
    """The bin holding the k-th largest entry, and how many entries lie in the bins above it."""
    from_top = np.cumsum(counts[::-1])
    i = int(np.searchsorted(from_top, k))
    return counts.size - 1 - i, int(from_top[i - 1]) if i else 0


def whole_model_thresholds(tensors: Callable[[], Iterable[tuple[torch.Tensor, list[torch.Tensor]]]],
                           density: list[float], total: int) -> list[float]:
    """TIES' trim as the paper does it: for each input, the k-th largest |δ| over its whole task vector
    (k = ``kept_count(density, total)``), exactly. ``tensors()`` yields (θ_base, [θᵢ]) for every tensor of
    the model and is called once per pass, at most twice. Cut at the result keeping every |δ| >= it (ties
    at the threshold all kept, as the paper's code does); −1 keeps all, +inf none."""
    count = len(density)
    keep = [kept_count(d, total) for d in density]
    thresholds = [-1.0 if k == total else math.inf for k in keep]
    todo = [i for i in range(count) if 0 < keep[i] < total]
    if not todo:
        return thresholds
    high = {i: np.zeros(HIGH_BINS, dtype=np.int64) for i in todo}
    for base, xs in tensors():
        magnitude_histograms([xs[i] for i in todo], base, [-1] * len(todo), [high[i] for i in todo])
        del base, xs  # before the next tensor is read
    bins = {i: _bin_of_rank(high[i], keep[i]) for i in todo}
    low = {i: np.zeros(LOW_BINS, dtype=np.int64) for i in todo}
    for base, xs in tensors():
        magnitude_histograms([xs[i] for i in todo], base, [bins[i][0] for i in todo], [low[i] for i in todo])
        del base, xs
    for i in todo:
        top, above = bins[i]
        bottom, _ = _bin_of_rank(low[i], keep[i] - above)
        thresholds[i] = float(np.array([(top << 16) | bottom], dtype=np.uint32).view(np.float32)[0])
    return thresholds


def top_count(density: float, n: int) -> int:
    """How many of ``n`` entries a TIES trim at ``density`` keeps: at least one."""
    return max(1, int(density * n))


def kept_count(density: float, n: int) -> int:
    """``top_count``, except that density >= 1 keeps all ``n`` and density <= 0 (or no entries) keeps none."""
    if density >= 1:
        return n
    return 0 if density <= 0 or n == 0 else min(n, top_count(density, n))


def magnitude_rank(x: torch.Tensor, base: torch.Tensor | None, k: int) -> tuple[float, int, int]:
    """The k-th largest |x − base| (|x| without a base), and how many entries are above it and equal to it.

    Large CPU tensors: a strided sample brackets the k-th value, one chunked pass counts the entries
    above the bracket and keeps the few inside it, and a selection over those finishes: no full-size
    scratch copy, and numpy's kernels (which release the GIL) do the passes. Otherwise, or when the
    sample's bracket misses, one selection (np.partition, or kthvalue on a GPU) over all magnitudes.
    """
    n = x.numel()
    if x.device.type == "cpu" and n >= BRACKETED:
        found = _bracketed_rank(x, base, k)
        if found is not None:
            return found
    mag = (x - base) if base is not None else x.detach().clone()
    mag = mag.abs_().reshape(-1)
    if mag.device.type != "cpu":
        threshold = mag.kthvalue(n - k + 1).values
        return float(threshold), int((mag > threshold).sum()), int((mag == threshold).sum())
    a = mag.numpy()
    a.partition(n - k)
    threshold = a[n - k]
    return float(threshold), int(np.count_nonzero(a[n - k:] > threshold)), int(np.count_nonzero(a == threshold))


def _sample_bracket(xf: np.ndarray, bf: np.ndarray | None, k: int) -> tuple[float, float, float] | None:
    """Values [lo, hi] from a strided sample that should hold the k-th largest |x − base| (6 binomial sigmas
    either side; callers check, since a sample of structured data can mislead), and the expected fraction
    of all entries inside. None when the bracket would be too wide to help.

    The stride is odd, so on a matrix whose row length is a power of two the sample visits every column.
    """
    n = xf.size
    stride = max(64, n // SAMPLE) | 1  # at most ~SAMPLE values, at least 64 entries per sampled one
    sample = np.abs(xf[::stride] - bf[::stride] if bf is not None else xf[::stride])
    m = sample.size
    # the k-th largest sits near rank m - k·m/n of the sorted sample; bracket it by 6 binomial sigmas
    centre = m - k * m / n
    margin = 6 * math.sqrt(m * (k / n) * (1 - k / n)) + 16
    lo_at, hi_at = int(centre - margin), int(math.ceil(centre + margin))
    if hi_at - lo_at > m // 8:
        return None
    ranks = [r for r in (lo_at, hi_at) if 0 <= r < m]
    if ranks:
        sample.partition(ranks)
    lo = sample[lo_at] if lo_at >= 0 else -np.inf
    hi = sample[hi_at] if hi_at < m else np.inf
    # counted, not (hi_at - lo_at) / m: runs of equal magnitudes (bfloat16 weights) widen the bracket
    return float(lo), float(hi), np.count_nonzero((sample >= lo) & (sample <= hi)) / m


def _bracketed_rank(x: torch.Tensor, base: torch.Tensor | None, k: int, chunk: int = 1 << 17):
    xf = x.detach().reshape(-1).numpy()
    bf = base.detach().reshape(-1).numpy() if base is not None else None
    n = xf.size
    bracket = _sample_bracket(xf, bf, k)
    if bracket is None:
        return None  # too wide to be worth it
    lo, hi, fraction = bracket
    expected = n * fraction
    counted = _count_bracket(xf, bf, lo, hi, expected) if xf.dtype == np.float32 else None
    if counted is None:
        counted = _count_bracket_numpy(xf, bf, lo, hi, chunk)
    above, kept = counted
    inside = np.concatenate(kept) if kept else np.empty(0, dtype=xf.dtype)
    found = _select_inside(inside, k - above)
    if found is None:
        return None
    threshold, greater, equal = found
    return float(threshold), above + greater, equal


def _select_inside(inside: np.ndarray, rank: int) -> tuple[np.float32, int, int] | None:
    """The rank-th largest of the magnitudes inside a bracket, and how many inside are above it and equal
    to it; None when the rank falls outside the bracket (the sample misled). Partitions ``inside``."""
    if not 1 <= rank <= inside.size:
        return None
    inside.partition(inside.size - rank)
    t = inside[inside.size - rank]
    return t, int(np.count_nonzero(inside > t)), int(np.count_nonzero(inside == t))


def ties_fused(tensors: list[torch.Tensor], base: torch.Tensor, weight: list[float], density: list[float],
               normalize: bool, lambda_: float, mergekit: bool) -> torch.Tensor | None:
    """A whole TIES merge of one tensor by the native kernels, in one pass over the inputs plus a pass
    over the few positions it could not decide; None (nothing done) where it does not apply, after which
    ``ties_cutoff`` + ``mixing.mix`` do the same merge.

    Each input's threshold is bracketed from a sample. The pass counts the magnitudes above each bracket,
    keeps the ones inside it (with their indices), and merges every position where no input falls inside
    its bracket; the exact thresholds (ties kept in index order, as ``ties_cutoff``) then settle the rest.
    Falls back when a bracket misses. With ``mergekit``, equal magnitudes straddling a cut are kept as
    torch's sort orders them (replayed by ``kernels.sort_ties``), as mergekit keeps them.
    """
    n = base.numel()
    if base.device.type != "cpu" or n < BRACKETED or any(t.dtype != torch.float32 for t in (base, *tensors)):
        return None
    kernels = mixing.native_kernels()
    if kernels is None:
        return None
    bf = mixing.flat_array(base)
    xs = tuple(mixing.flat_array(t) for t in tensors)
    keep = [kept_count(d, n) for d in density]
    brackets = _brackets(xs, bf, keep, n)
    if brackets is None:
        return None
    low, high, threshold, tie_end, fraction = brackets
    w = np.array(weight, dtype=np.float32)
    flags = (normalize, np.float32(lambda_), all(v == 1.0 for v in weight))
    out = torch.empty(n, dtype=torch.float32)
    o = out.numpy()
    parts: dict[int, tuple] = {}

    def scan(lo: int, hi: int) -> None:
        expected = fraction * (hi - lo)
        cap = int(1.25 * expected + 6 * math.sqrt(expected)) + 4096
        values = np.empty((len(xs), cap), dtype=np.float32)
        indices = np.empty((len(xs), cap), dtype=np.int64)
        counts = np.zeros((len(xs), 2), dtype=np.int64)
        pending = np.empty(len(xs) * cap, dtype=np.int64)
        waiting, overflow = kernels.ties_scan(xs, bf, o, low, high, w, *flags, lo, hi, values, indices, counts, pending)
        parts[lo] = (values, indices, counts, pending[:waiting], overflow)

    mixing.parallel_ranges(n, scan)
    ordered = [parts[lo] for lo in sorted(parts)]
    if any(p[4] for p in ordered):
        return None
    chosen = _exact_thresholds(kernels, xs, bf, ordered, keep, threshold, tie_end, mergekit)
    if chosen is None:
        return None
    waiting = [p[3] for p in ordered if p[3].size]
    mixing.run_parallel([lambda pending=pending: kernels.ties_fixup(xs, bf, o, threshold, tie_end, w, *flags, pending)
                         for pending in waiting])
    if chosen:
        _settle_chosen_ties(kernels, xs, bf, o, threshold, tie_end, w, flags, chosen, n)
    return out.reshape(base.shape)


def _brackets(xs: tuple[np.ndarray, ...], bf: np.ndarray, keep: list[int], n: int) -> tuple | None:
    """Each input's magnitude bracket from a sample (low, high), the thresholds and tie ends known already
    (keep all, keep none), and the largest fraction of positions a bracket holds; None when a sample fails."""
    count = len(xs)
    low, high = np.full(count, np.inf, dtype=np.float32), np.full(count, np.inf, dtype=np.float32)
    threshold, tie_end = np.full(count, np.inf, dtype=np.float32), np.zeros(count, dtype=np.int64)
    fraction = 0.0
    for i, x in enumerate(xs):
        if keep[i] == n:  # keep all: every magnitude is above the bracket
            high[i], threshold[i], tie_end[i] = -1.0, -1.0, n
        elif keep[i] > 0:
            bracket = _sample_bracket(x, bf, keep[i])
            if bracket is None:
                return None
            low[i], high[i], f = bracket
            fraction = max(fraction, f)
    return low, high, threshold, tie_end, fraction


def _exact_thresholds(kernels, xs, bf, ordered: list[tuple], keep: list[int], threshold: np.ndarray,
                      tie_end: np.ndarray, mergekit: bool) -> dict | None:
    """Settle each input's exact threshold and tie end (in place) from what the scan kept inside the brackets.
    Returns the inputs whose kept ties mergekit's sort chooses (see ``_settle_chosen_ties``); None: fall back."""
    n = bf.size
    chosen: dict[int, tuple[np.ndarray, np.ndarray]] = {}
    for i in range(len(xs)):
        if not 0 < keep[i] < n:
            continue
        above = sum(int(p[2][i, 0]) for p in ordered)
        inside = np.concatenate([p[0][i, : p[2][i, 1]] for p in ordered])
        rank = keep[i] - above  # the threshold is the rank-th largest inside the bracket
        found = _select_inside(inside.copy(), rank)  # the copy keeps ``inside`` in index order for ties
        if found is None:
            return None
        t, greater, equal = found
        kept_ties = rank - greater
        threshold[i], tie_end[i] = t, n
        if equal <= kept_ties:
            continue
        if mergekit:
            if not _replay_agrees(kernels):
                return None
            # mergekit keeps the tied magnitudes its sort puts first: replayed, then settled below
            keys = np.subtract(xs[i], bf)
            order = kernels.sort_ties(np.abs(keys, out=keys), True, [t], owned=True, keep_keys=False,
                                      cuts=(keep[i], -1))  # the kept ones: sorted positions before keep[i]
            del keys
            if order is None:
                return None
            chosen[i] = (order[0], order[0][:kept_ties])
            continue
        where = np.concatenate([p[1][i, : p[2][i, 1]] for p in ordered])[inside == t]  # ascending
        tie_end[i] = where[kept_ties - 1] + 1
    return chosen


def _settle_chosen_ties(kernels, xs, bf, o, threshold, tie_end, w, flags, chosen: dict, n: int) -> None:
    """Redo the positions where an input's magnitude ties its threshold and only some of the ties are kept
    (``chosen[i]`` = (all tied positions, the kept ones)): grouped by which inputs keep their tie there,
    each group goes through ``ties_fixup`` with those inputs keeping all ties and the others none."""
    inputs = sorted(chosen)
    positions = np.unique(np.concatenate([chosen[i][0] for i in inputs]))
    code = np.zeros(positions.size, dtype=np.int64)
    for bit, i in enumerate(inputs):
        code |= np.isin(positions, chosen[i][1]).astype(np.int64) << bit
    for group in np.unique(code):
        ends = tie_end.copy()
        for bit, i in enumerate(inputs):
            ends[i] = n if (int(group) >> bit) & 1 else 0
        kernels.ties_fixup(xs, bf, o, threshold, ends, w, *flags, np.ascontiguousarray(positions[code == group]))


def _count_bracket(xf: np.ndarray, bf: np.ndarray | None, lo: float, hi: float, expected: float):
    """The native counting pass, one range per core: (entries above ``hi``, arrays of those in [lo, hi]),
    or None without the kernels or when more landed inside than the buffers hold."""
    n = xf.size
    kernels = mixing.native_kernels()
    if kernels is None:
        return None
    workers = mixing.worker_count(n)
    cap = int(1.5 * expected / workers) + 4096
    base = bf if bf is not None else xf
    results: list = []

    def count(lo_at: int, hi_at: int) -> None:
        kept = np.empty(cap, dtype=xf.dtype)
        above, copied, spilled = kernels.bracket_range(xf, base, bf is not None, np.float32(lo), np.float32(hi),
                                                       lo_at, hi_at, kept)
        results.append((above, kept[:copied], spilled))

    mixing.parallel_ranges(n, count, workers)
    if any(spilled for _, _, spilled in results):
        return None
    return sum(a for a, _, _ in results), [kept for _, kept, _ in results]


def _count_bracket_numpy(xf: np.ndarray, bf: np.ndarray | None, lo: float, hi: float, chunk: int):
    n = xf.size
    above, kept = 0, []
    buf = np.empty(min(chunk, n), dtype=xf.dtype)
    for s in range(0, n, chunk):
        part = buf[: min(chunk, n - s)]
        if bf is not None:
            np.subtract(xf[s:s + part.size], bf[s:s + part.size], out=part)
        else:
            part[:] = xf[s:s + part.size]
        np.abs(part, out=part)
        above += int(np.count_nonzero(part > hi))
        kept.append(part[(part >= lo) & (part <= hi)])
    return above, kept


def _index_after(x: torch.Tensor, base: torch.Tensor | None, value: float, count: int, chunk: int = 1 << 20) -> int:
    """The flat index just past the ``count``-th entry (in index order) whose |x − base| equals ``value``."""
    flat_x = x.reshape(-1)
    flat_b = base.reshape(-1) if base is not None else None
    kernels = mixing.native_kernels() if x.device.type == "cpu" and x.dtype == torch.float32 else None
    if kernels is not None:
        xf = mixing.flat_array(flat_x)
        bf = mixing.flat_array(flat_b) if flat_b is not None else xf
        return int(kernels.nth_equal(xf, bf, flat_b is not None, np.float32(value), count))
    seen = 0
    for s in range(0, flat_x.numel(), chunk):
        part = flat_x[s:s + chunk] if flat_b is None else flat_x[s:s + chunk] - flat_b[s:s + chunk]
        hits = (part.abs() == value).nonzero().squeeze(1)
        if seen + hits.numel() >= count:
            return s + int(hits[count - seen - 1]) + 1
        seen += hits.numel()
    return flat_x.numel()


def cutoff_mask(delta: torch.Tensor, cutoff: Cutoff) -> torch.Tensor:
    """The entries of ``delta`` that ``cutoff`` keeps, as a bool mask of its shape."""
    mag = delta.abs().reshape(-1)
    mask = mag >= cutoff.threshold
    if cutoff.tie_end is not None:
        torch.gt(mag[cutoff.tie_end:], cutoff.threshold, out=mask[cutoff.tie_end:])
    return mask.reshape(delta.shape)


def ties_trim(delta: torch.Tensor, density: float, rescale: str | None = None, inplace: bool = False,
              mergekit: bool = False, tie_at_cut: bool = False) -> torch.Tensor:
    """``delta`` masked to the top ``density`` fraction of its magnitudes (see ``ties_cutoff``).

    ``tie_at_cut`` says ``ties_cutoff`` already found mergekit's case (equal magnitudes straddling the
    cut), so the threshold is not searched for again before the sort."""
    cutoff = None if tie_at_cut and mergekit else ties_cutoff(delta, None, density, mergekit)
    if cutoff is None:
        mask = _sorted_band(delta.abs(), 0, top_count(density, delta.numel()), descending=True)
    else:
        mask = cutoff_mask(delta, cutoff)
    if rescale == "l1":
        return l1_rescaled(delta, delta * mask)
    return delta.mul_(mask) if inplace else delta * mask


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


def _sorted_band(mag: torch.Tensor, start: int, count: int, descending: bool, scratch: bool = False) -> torch.Tensor:
    """Exactly ``count`` entries from rank ``start`` on, ties ordered as torch's sort orders them.

    Only reached when equal magnitudes straddle a threshold: there the choice is arbitrary, and
    following torch's sort keeps the result identical to mergekit's. The order of the tied entries is
    replayed by ``kernels.sort_ties`` (a few passes, not a sort) where the native kernels are built
    and agree with this torch's sort; otherwise the tensor is sorted. ``mag``: non-negative, finite;
    with ``scratch`` a float32 ``mag`` is overwritten (saves a copy).
    """
    flat = mag.reshape(-1).float()
    n = flat.numel()
    mask = torch.zeros(n, dtype=torch.bool, device=mag.device)
    count = max(0, min(count, n - start))
    if count == 0:
        return mask.reshape(mag.shape)
    kernels = mixing.native_kernels()

    def sort() -> torch.Tensor:
        mask[torch.sort(flat, descending=descending).indices[start:start + count]] = True
        return mask.reshape(mag.shape)

    if flat.device.type != "cpu" or kernels is None or not _replay_agrees(kernels):
        return sort()
    keys = flat.numpy()
    # the keys at the band's first and last rank (from rank 0, only the last one's ties matter), as the
    # k-th largest: magnitude_rank brackets it from a sample instead of partitioning a copy
    def kth(rank: int) -> np.float32:
        return np.float32(magnitude_rank(flat, None, rank + 1 if descending else n - rank)[0])
    b = kth(start + count - 1)
    a = kth(start) if start > 0 else b
    m = mask.numpy()
    ahead = (lambda v: keys > v) if descending else (lambda v: keys < v)
    before_a = int(np.count_nonzero(ahead(a)))
    before_b = int(np.count_nonzero(ahead(b)))
    if start == 0:
        m |= ahead(b)
    elif a != b:
        m |= ahead(b) & ~ahead(a) & (keys != a)  # strictly between the two cut keys
    owned = scratch or flat.data_ptr() != mag.data_ptr()
    ties = kernels.sort_ties(keys, descending, [a] if a == b else [a, b], owned=owned,
                             cuts=(start, start + count))
    if ties is None:  # the sort's heapsort fallback (keys restored): only a real sort tells
        m[:] = False
        return sort()
    if start == 0:
        m[ties[0][:count - before_a]] = True
    elif a == b:
        m[ties[0][start - before_a:start + count - before_a]] = True
    else:
        m[ties[0][start - before_a:]] = True
        m[ties[1][:start + count - before_b]] = True
    return mask.reshape(mag.shape)


_REPLAY: dict[str, bool] = {}


def _replay_agrees(kernels) -> bool:
    """Whether ``kernels.sort_ties`` reproduces this torch's sort order of ties (checked once on a small
    tensor full of ties, both directions); if not, ``_sorted_band`` sorts."""
    if "ok" not in _REPLAY:
        g = torch.Generator().manual_seed(0)
        x = torch.randint(0, 40, (20_000,), generator=g).float()
        ok = True
        for desc in (True, False):
            order = torch.sort(x, descending=desc).indices
            got = kernels.sort_ties(x.numpy(), desc, [7.0, 23.0])
            ok = ok and got is not None and all(np.array_equal(order[x[order] == v].numpy(), t)
                                                for v, t in zip((7.0, 23.0), got))
        _REPLAY["ok"] = ok
    return _REPLAY["ok"]
