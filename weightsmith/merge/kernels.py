"""Compiled CPU kernels for the task-vector merges (numba); the torch/numpy code stays as the fallback.

- ``mix_range``: θ_base + λ·merge(δ) over a range of flat indices, TIES' trim, sign election and
  disjoint mean fused into one pass that reads each input once. It does exactly the float32
  arithmetic of ``mixing.mix``'s torch kernel in the same order, so both give bitwise-equal results.
- ``ties_scan`` + ``ties_fixup``: a whole TIES merge before its thresholds are known (see
  ``sparsify.ties_fused``), with the same arithmetic as ``mix_range``.
- ``bracket_range``: the counting pass of a top-k threshold search; ``nth_equal``: where a run of
  tied magnitudes is cut.

Loops work on per-block slices indexed from 0 (numba indexes ``a[s + j]`` with a wraparound check
that stops LLVM from vectorising) and are branch-free where they can be; data-dependent branches are
left only where they are rarely taken. The kernels release the GIL, so ``mixing.parallel_ranges`` runs
them on every core. Compiled code is cached on disk by numba (``NUMBA_CACHE_DIR`` moves it);
``WEIGHTSMITH_JIT=0`` turns the kernels off.
"""
from __future__ import annotations

import numba
import numpy as np

BLOCK = 2048  # elements per input held in the scratch block: K + 3 rows of it stay in the L1/L2 cache

jit = numba.njit(nogil=True, cache=True, error_model="numpy")


@numba.njit(nogil=True, error_model="numpy", inline="always")
def _elect_block(d, k, n, total, agree, divisor, weight, normalize, lambda_, b, o):
    """TIES' elected sign and disjoint mean over one block: o[j] = b[j] + λ·Σ agreeing d[i, j] (÷ their
    weights when ``normalize``), given total[j] = Σ d[i, j]. Branch-free loops, so LLVM vectorises them."""
    one, zero = np.float32(1.0), np.float32(0.0)
    agree[:n] = zero
    divisor[:n] = zero
    for i in range(k):
        di, w = d[i], weight[i]
        for j in range(n):
            a = di[j] * (one if total[j] >= zero else -one)
            positive = a > zero
            agree[j] += a if positive else zero
            divisor[j] += w if positive else zero
    for j in range(n):
        mixed = agree[j] * (one if total[j] >= zero else -one)
        if normalize:
            mixed = mixed / (divisor[j] if divisor[j] != zero else one)
        if lambda_ != one:
            mixed = mixed * lambda_
        o[j] = b[j] + mixed


@jit
def mix_range(xs, is_delta, threshold, tie_end, weight, base, out, lo, hi, consensus, normalize,
              total_weight, lambda_, unit):
    """out[j] = base[j] + λ·merge(δ)[j] for j in [lo, hi): see ``mixing.mix`` for the arithmetic.

    Input i is a delta when ``is_delta[i]``, else θ with δ = θ − base trimmed to |δ| > threshold[i],
    or |δ| == threshold[i] before flat index tie_end[i] (threshold −1 keeps all, +inf none).
    """
    k = len(xs)
    d = np.empty((k, BLOCK), dtype=np.float32)
    total = np.empty(BLOCK, dtype=np.float32)
    agree = np.empty(BLOCK, dtype=np.float32)
    divisor = np.empty(BLOCK, dtype=np.float32)
    one, zero = np.float32(1.0), np.float32(0.0)
    for s in range(lo, hi, BLOCK):
        n = min(hi, s + BLOCK) - s
        total[:n] = zero
        b, o = base[s:s + n], out[s:s + n]
        for i in range(k):
            x, di, w = xs[i][s:s + n], d[i], weight[i]
            if is_delta[i]:
                for j in range(n):
                    v = x[j]
                    if not unit:
                        v = v * w
                    di[j] = v
                    total[j] += v
            else:
                # ties at the threshold are kept before tie_end: |δ| >= t there, |δ| > t after (two
                # loops, so that neither compares indices)
                t, split = threshold[i], min(n, max(0, tie_end[i] - s))
                for j in range(split):
                    v = x[j] - b[j]
                    v = v if abs(v) >= t else zero
                    if not unit:
                        v = v * w
                    di[j] = v
                    total[j] += v
                for j in range(split, n):
                    v = x[j] - b[j]
                    v = v if abs(v) > t else zero
                    if not unit:
                        v = v * w
                    di[j] = v
                    total[j] += v
        if consensus:
            _elect_block(d, k, n, total, agree, divisor, weight, normalize, lambda_, b, o)
        else:
            for j in range(n):
                mixed = total[j] / total_weight if normalize else total[j]
                if lambda_ != one:
                    mixed = mixed * lambda_
                o[j] = b[j] + mixed


@jit
def bracket_range(x, base, has_base, low, high, lo, hi, kept):
    """Over [lo, hi): how many |x − base| exceed ``high``, and those in [low, high] copied into ``kept``
    (returns above, copied, and how many more did not fit)."""
    above, copied, spilled = 0, 0, 0
    cap = kept.shape[0]
    flags = np.empty(BLOCK, dtype=np.float32)
    one, zero = np.float32(1.0), np.float32(0.0)
    for s in range(lo, hi, BLOCK):
        n = min(hi, s + BLOCK) - s
        xb, bb = x[s:s + n], base[s:s + n]
        count, hits = np.int32(0), np.int32(0)
        for j in range(n):
            m = abs(xb[j] - bb[j]) if has_base else abs(xb[j])
            # fl(a − b) has the sign of a − b and is zero only when a == b: one compare tests low <= m <= high
            flag = min(m - low, high - m) >= zero
            count += np.int32(1) if m > high else np.int32(0)
            hits += np.int32(1) if flag else np.int32(0)
            flags[j] = one if flag else zero
        above += count
        if hits:
            for j in range(n):
                if flags[j] != zero:
                    if copied < cap:
                        kept[copied] = abs(xb[j] - bb[j]) if has_base else abs(xb[j])
                        copied += 1
                    else:
                        spilled += 1
    return above, copied, spilled


@jit
def nth_equal(x, base, has_base, value, count):
    """The flat index just past the ``count``-th entry whose |x − base| equals ``value`` (len(x) if fewer)."""
    seen = 0
    for j in range(x.shape[0]):
        m = abs(x[j] - base[j]) if has_base else abs(x[j])
        if m == value:
            seen += 1
            if seen == count:
                return j + 1
    return x.shape[0]


@numba.njit(nogil=True, error_model="numpy", inline="always")
def _elect(d, k, weight, normalize, lambda_):
    """TIES' elected-sign disjoint mean of the weighted, trimmed deltas ``d[:k]``, exactly as ``mix_range``."""
    one, zero = np.float32(1.0), np.float32(0.0)
    total = zero
    for i in range(k):
        total += d[i]
    sign = one if total >= zero else -one
    agree, divisor = zero, zero
    for i in range(k):
        a = d[i] * sign
        if a > zero:
            agree += a
            divisor += weight[i]
    mixed = agree * sign
    if normalize:
        mixed = mixed / (divisor if divisor != zero else one)
    if lambda_ != one:
        mixed = mixed * lambda_
    return mixed


@jit
def ties_scan(xs, base, out, low, high, weight, normalize, lambda_, unit, lo, hi, values, indices, counts, pending):
    """One pass of a TIES merge before its thresholds are known, over [lo, hi).

    Input i's threshold lies in [low[i], high[i]] (a bracket from a sample): |δ| above it is kept for
    sure, below it dropped. Every position gets the output those decisions give; positions where some
    input falls inside its bracket are also listed in ``pending`` for ``ties_fixup`` to redo, and each
    input's in-bracket magnitudes are copied into ``values[i]`` with their flat ``indices[i]``
    (ascending). ``counts[i]`` = (above, in bracket). Returns (pending count, overflowed): on overflow
    the buffers were too small and nothing is usable.

    Blocks as in ``mix_range``: the per-input loop is branch-free (vectorised) and flags the in-bracket
    entries; a scalar loop copies them out only in blocks that have any.
    """
    k = len(xs)
    cap, pcap = values.shape[1], pending.shape[0]
    d = np.empty((k, BLOCK), dtype=np.float32)
    inside = np.empty((k, BLOCK), dtype=np.float32)
    total = np.empty(BLOCK, dtype=np.float32)
    agree = np.empty(BLOCK, dtype=np.float32)
    divisor = np.empty(BLOCK, dtype=np.float32)
    undecided = np.empty(BLOCK, dtype=np.bool_)
    one, zero = np.float32(1.0), np.float32(0.0)
    waiting = 0
    for s in range(lo, hi, BLOCK):
        n = min(hi, s + BLOCK) - s
        total[:n] = zero
        any_inside = False
        b, o = base[s:s + n], out[s:s + n]
        for i in range(k):
            x, di, fi, w, bottom, top = xs[i][s:s + n], d[i], inside[i], weight[i], low[i], high[i]
            above, hits = np.int32(0), np.int32(0)
            for j in range(n):
                v = x[j] - b[j]
                m = abs(v)
                keep = m > top
                # one compare for bottom <= m <= top (see bracket_range)
                flag = min(m - bottom, top - m) >= zero
                above += np.int32(1) if keep else np.int32(0)
                hits += np.int32(1) if flag else np.int32(0)
                fi[j] = one if flag else zero
                v = v if keep else zero
                if not unit:
                    v = v * w
                di[j] = v
                total[j] += v
            counts[i, 0] += above
            if hits:
                c = counts[i, 1]
                if c + hits > cap:
                    return waiting, True
                if not any_inside:
                    undecided[:n] = False
                    any_inside = True
                for j in range(n):
                    if fi[j] != zero:
                        values[i, c] = abs(x[j] - b[j])
                        indices[i, c] = s + j
                        c += 1
                        undecided[j] = True
                counts[i, 1] = c
        _elect_block(d, k, n, total, agree, divisor, weight, normalize, lambda_, b, o)
        if any_inside:
            for j in range(n):
                if undecided[j]:
                    if waiting >= pcap:
                        return waiting, True
                    pending[waiting] = s + j
                    waiting += 1
    return waiting, False


@jit
def ties_fixup(xs, base, out, threshold, tie_end, weight, normalize, lambda_, unit, pending):
    """The outputs ``ties_scan`` left pending, now that every input's threshold is known."""
    k = len(xs)
    d = np.empty(k, dtype=np.float32)
    zero = np.float32(0.0)
    for p in range(pending.shape[0]):
        j = pending[p]
        b = base[j]
        for i in range(k):
            v = xs[i][j] - b
            m = abs(v)
            t = threshold[i]
            v = v if (m > t) | ((m == t) & (j < tie_end[i])) else zero
            d[i] = v if unit else v * weight[i]
        out[j] = b + _elect(d, k, weight, normalize, lambda_)
