"""Native CPU kernels for the task-vector merges (``_kernels.c``, built with the package); the torch/numpy
code stays as the fallback.

- ``mix_range``: θ_base + λ·merge(δ) over a range of flat indices, TIES' trim, sign election and
  disjoint mean fused into one pass that reads each input once. It does exactly the float32
  arithmetic of ``mixing.mix``'s torch kernel in the same order, so both give bitwise-equal results.
- ``ties_scan`` + ``ties_fixup``: a whole TIES merge before its thresholds are known (see
  ``sparsify.ties_fused``), with the same arithmetic as ``mix_range``.
- ``sort_ties``: the order torch's unstable CPU sort gives equal keys, for the keys equal to one or two
  values, replayed without a full sort (mergekit's top-k keeps tied magnitudes in that order).
- ``half_keys`` + ``half_mix``: the task-vector merges in bfloat16/float16 rounded op for op as mergekit's
  torch arithmetic in that dtype (``compat_native``): a histogram of the trimmed magnitudes, then one pass.
- ``bracket_range``: the counting pass of a top-k threshold search; ``nth_equal``: where a run of
  tied magnitudes is cut; ``magnitude_histogram``: the counting passes of a whole-model top-k threshold.

The C functions are called through ctypes, which releases the GIL for the call, so
``mixing.parallel_ranges`` runs them on every core. Loading them costs a few milliseconds. Importing this
module raises ImportError when the extension was not built (no C compiler at install time);
``WEIGHTSMITH_NATIVE=0`` turns the kernels off. The wrappers check dtypes, contiguity and bounds, so a
wrong call raises instead of reading stray memory.
"""
from __future__ import annotations

import ctypes

import numpy as np

from . import _kernels

_lib = ctypes.CDLL(_kernels.__file__)
_P, _I64, _INT, _F32 = ctypes.c_void_p, ctypes.c_int64, ctypes.c_int, ctypes.c_float


def _bind(name: str, restype, *argtypes):
    fn = getattr(_lib, name)
    fn.restype, fn.argtypes = restype, list(argtypes)
    return fn


_mix_range = _bind("ws_mix_range", _INT, _I64, _P, _P, _P, _P, _P, _P, _P, _I64, _I64, _INT, _INT, _F32, _F32, _INT)
_bracket_range = _bind("ws_bracket_range", None, _P, _P, _INT, _F32, _F32, _I64, _I64, _P, _I64, _P)
_nth_equal = _bind("ws_nth_equal", _I64, _P, _P, _INT, _F32, _I64, _I64)
_magnitude_histograms = _bind("ws_magnitude_histograms", _INT, _I64, _P, _P, _I64, _I64, _P, _P)
_ties_scan = _bind("ws_ties_scan", _I64, _I64, _P, _P, _P, _P, _P, _P, _INT, _F32, _INT, _I64, _I64, _P, _P, _I64,
                   _P, _P, _I64)
_sort_ties = _bind("ws_sort_ties", _INT, _P, _P, _I64, _INT, _F32, _F32, _I64, _I64)
_sort_ties16 = _bind("ws_sort_ties16", _INT, _P, _P, _I64, _INT, ctypes.c_int32, ctypes.c_int32, _I64, _I64)
_sort_ties_list = _bind("ws_sort_ties_list", _INT, _P, _I64, _INT, _F32, _F32, _I64, _I64, _P, _P, _P, _I64, _P)
_sort_ties_list16 = _bind("ws_sort_ties_list16", _INT, _P, _I64, _INT, ctypes.c_int32, ctypes.c_int32, _I64, _I64,
                          _P, _P, _P, _I64, _P)
_ties_fixup = _bind("ws_ties_fixup", _INT, _I64, _P, _P, _P, _P, _P, _P, _INT, _F32, _INT, _P, _I64)
_half_keys = _bind("ws_half_keys", None, _P, _P, _INT, _I64, _I64, _P, _P)
_half_mix = _bind("ws_half_mix", _INT, _I64, _P, _P, _P, _P, _INT, _P, _P, _P, _P, _P, _P, _INT, _INT, _F32, _F32, _I64,
                  _I64)
HALF_CODES = {"bfloat16": 1, "float16": 2}  # the dtype codes of the half-precision kernels


def _ptr(a: np.ndarray, dtype, size: int | None = None, writable: bool = False) -> int:
    """The address of a C-contiguous ``dtype`` array holding at least ``size`` elements."""
    if a.dtype != dtype or not a.flags.c_contiguous:
        raise TypeError(f"kernels: expected a contiguous {np.dtype(dtype).name} array, got {a.dtype}")
    if size is not None and a.size < size:
        raise ValueError(f"kernels: array of {a.size} elements, {size} needed")
    if writable and not a.flags.writeable:
        raise ValueError("kernels: output array is read-only")
    return a.ctypes.data


def _inputs(xs, hi: int):
    return (ctypes.c_void_p * len(xs))(*(_ptr(x, np.float32, hi) for x in xs))


def _range(lo: int, hi: int) -> None:
    if not 0 <= lo <= hi:
        raise ValueError(f"kernels: bad range [{lo}, {hi})")


def mix_range(xs, is_delta, threshold, tie_end, weight, base, out, lo, hi, consensus, normalize,
              total_weight, lambda_, unit) -> None:
    """out[j] = base[j] + λ·merge(δ)[j] for j in [lo, hi): see ``mixing.mix`` for the arithmetic.

    Input i is a delta when ``is_delta[i]``, else θ with δ = θ − base trimmed to |δ| > threshold[i],
    or |δ| == threshold[i] before flat index tie_end[i] (threshold −1 keeps all, +inf none).
    """
    _range(lo, hi)
    k = len(xs)
    code = _mix_range(k, _inputs(xs, hi), _ptr(is_delta, np.bool_, k), _ptr(threshold, np.float32, k),
                      _ptr(tie_end, np.int64, k), _ptr(weight, np.float32, k), _ptr(base, np.float32, hi),
                      _ptr(out, np.float32, hi, True), lo, hi, bool(consensus), bool(normalize), float(total_weight),
                      float(lambda_), bool(unit))
    if code:
        raise MemoryError("kernels: out of memory")


def bracket_range(x, base, has_base, low, high, lo, hi, kept) -> tuple[int, int, int]:
    """Over [lo, hi): how many |x − base| exceed ``high``, and those in [low, high] copied into ``kept``
    (returns above, copied, and how many more did not fit)."""
    _range(lo, hi)
    result = np.zeros(3, dtype=np.int64)
    _bracket_range(_ptr(x, np.float32, hi), _ptr(base, np.float32, hi), bool(has_base), float(low), float(high),
                   lo, hi, _ptr(kept, np.float32, writable=True), kept.size, result.ctypes.data)
    return int(result[0]), int(result[1]), int(result[2])


def nth_equal(x, base, has_base, value, count) -> int:
    """The flat index just past the ``count``-th entry whose |x − base| equals ``value`` (len(x) if fewer)."""
    return int(_nth_equal(_ptr(x, np.float32), _ptr(base, np.float32, x.size), bool(has_base), float(value),
                          count, x.size))


def magnitude_histogram(x, base, lo, hi, high, counts) -> None:
    """Add into ``counts`` the histogram of |x − base|'s float32 bits over [lo, hi): by the top 16 bits when
    ``high`` < 0 (32768 bins), else by the low 16 bits of the entries whose top 16 bits equal ``high``."""
    magnitude_histograms([x], base, lo, hi, [high], [counts])


def magnitude_histograms(xs, base, lo, hi, highs, counts) -> None:
    """``magnitude_histogram`` for several inputs over one base at once (the base is read once)."""
    _range(lo, hi)
    k = len(xs)
    if not len(highs) == len(counts) == k:
        raise ValueError("kernels: magnitude_histograms arguments do not match the inputs")
    high = np.array(highs, dtype=np.int32)
    sinks = (ctypes.c_void_p * k)(*(_ptr(c, np.int64, 1 << 15 if h < 0 else 1 << 16, True) for c, h in zip(counts, high)))
    if _magnitude_histograms(k, _inputs(xs, hi), _ptr(base, np.float32, hi), lo, hi, high.ctypes.data, sinks):
        raise MemoryError("kernels: out of memory")


def ties_scan(xs, base, out, low, high, weight, normalize, lambda_, unit, lo, hi, values, indices, counts,
              pending) -> tuple[int, bool]:
    """One pass of a TIES merge before its thresholds are known, over [lo, hi).

    Input i's threshold lies in [low[i], high[i]] (a bracket from a sample): |δ| above it is kept for
    sure, below it dropped. Every position gets the output those decisions give; positions where some
    input falls inside its bracket are also listed in ``pending`` for ``ties_fixup`` to redo, and each
    input's in-bracket magnitudes are copied into ``values[i]`` with their flat ``indices[i]``
    (ascending). ``counts[i]`` = (above, in bracket). Returns (pending count, overflowed): on overflow
    the buffers were too small and nothing is usable.
    """
    _range(lo, hi)
    k = len(xs)
    cap = values.shape[1]
    if values.shape != (k, cap) or indices.shape != (k, cap) or counts.shape != (k, 2):
        raise ValueError("kernels: ties_scan buffers do not match the inputs")
    waiting = _ties_scan(k, _inputs(xs, hi), _ptr(base, np.float32, hi), _ptr(out, np.float32, hi, True),
                         _ptr(low, np.float32, k), _ptr(high, np.float32, k), _ptr(weight, np.float32, k),
                         bool(normalize), float(lambda_), bool(unit), lo, hi, _ptr(values, np.float32, writable=True),
                         _ptr(indices, np.int64, writable=True), cap, _ptr(counts, np.int64, writable=True),
                         _ptr(pending, np.int64, writable=True), pending.size)
    return (0, True) if waiting < 0 else (int(waiting), False)


def ties_fixup(xs, base, out, threshold, tie_end, weight, normalize, lambda_, unit, pending) -> None:
    """The outputs ``ties_scan`` left pending, now that every input's threshold is known."""
    k, n = len(xs), base.size
    if pending.size and not 0 <= int(pending.min()) <= int(pending.max()) < n:
        raise ValueError("kernels: pending index out of range")
    code = _ties_fixup(k, _inputs(xs, n), _ptr(base, np.float32), _ptr(out, np.float32, n, True),
                       _ptr(threshold, np.float32, k), _ptr(tie_end, np.int64, k), _ptr(weight, np.float32, k),
                       bool(normalize), float(lambda_), bool(unit), _ptr(pending, np.int64), pending.size)
    if code:
        raise MemoryError("kernels: out of memory")


def sort_ties(keys, descending: bool, values, owned: bool = False, keep_keys: bool = True,
              index: np.ndarray | None = None, count: int | None = None, lean: bool = False,
              cuts: tuple[int, int] | None = None) -> list[np.ndarray] | None:
    """For each value in ``values`` (one or two), the flat indices of ``keys`` equal to it, in the order
    ``torch.sort(keys, descending, stable=False)`` puts them; None where the sort would have taken its
    heapsort fallback on those keys (then only a real sort tells), or for 2^31 keys or more.
    ``keys``: 1-D finite float32, or uint16 bits of non-negative finite bfloat16/float16 values (which sort
    as those values), permuted in place when ``owned`` (else copied), and restored on None unless
    ``keep_keys`` is False. Without that restore, the tied keys alone are followed (16 bytes each) while
    they are at most 1/256 of the keys (with ``lean``: a quarter); else an index array follows every key
    (4 bytes each; faster where many keys are tied: the list is rewritten at every partition).
    ``index``: int32 scratch for that array, reused across calls (fresh memory costs a page fault every
    4 KB). ``count``: how many keys equal the values, where the caller knows (saves a counting pass).
    ``cuts``: the sorted positions the caller will split the keys at (keys before each and from it on): tied
    keys then come in the sort's order only as far as those splits tell (a run of them on one side of every
    cut is listed in any order), which spares partitioning the ranges no cut passes through."""
    half = keys.dtype == np.uint16
    v = keys if owned else np.array(keys, dtype=keys.dtype if half else np.float32, copy=True)
    t = [(int if half else np.float32)(x) for x in values]
    t += [t[0]] * (2 - len(t))
    cast = int if half else float
    b1, b2 = cuts if cuts is not None else (-1, -1)
    ends = (bool(descending), cast(t[0]), cast(t[1]), int(b1), int(b2))
    if not (owned and keep_keys):
        found = np.zeros(1, np.int64)
        fn = _sort_ties_list16 if half else _sort_ties_list
        most = v.size // 4 if lean else v.size // 256
        cap = most if count is None else count
        while cap <= most:
            pos, ids, tmp = (np.empty(cap, np.int32), np.empty(cap, np.int32), np.empty(2 * cap, np.int32))
            code = fn(_ptr(v, v.dtype, writable=True), v.size, *ends, _ptr(pos, np.int32, writable=True),
                      _ptr(ids, np.int32, writable=True), _ptr(tmp, np.int32, writable=True), cap, found.ctypes.data)
            if code != 2:
                _check_replay(code, v.size)
                if code:
                    return None
                m = int(found[0])
                pos, ids = pos[:m], ids[:m]
                return [ids[v[pos] == x].astype(np.int64) for x in t[:len(values)]]
            cap = int(found[0])  # a count that was wrong, or too many ties for the list: counted now
    ix = index[:v.size] if index is not None and index.size >= v.size else np.empty(v.size, dtype=np.int32)
    fn = _sort_ties16 if half else _sort_ties
    code = fn(_ptr(v, v.dtype, writable=True), _ptr(ix, np.int32, writable=True), v.size, *ends)
    _check_replay(code, v.size)
    if code:
        if owned:  # put the keys back where they were
            v[ix] = v.copy()
        return None
    return [ix[v == x].astype(np.int64) for x in t[:len(values)]]


def _check_replay(code: int, n: int) -> None:
    if code < 0 and n <= np.iinfo(np.int32).max:
        raise ValueError("kernels: sort_ties needs finite keys")


def _half(a: np.ndarray, size: int, writable: bool = False) -> int:
    """The address of a C-contiguous 16-bit array (bfloat16/float16 bits) of at least ``size`` elements."""
    return _ptr(a, np.uint16, size, writable)


def half_keys(x, base, dtype: str, lo: int, hi: int, keys, counts) -> None:
    """Add into ``counts`` (32768 bins) the histogram of |round(x − base)|'s magnitude bits over [lo, hi) in
    ``dtype``; ``keys`` (uint16, or None) receives those bits. Non-finite magnitudes fall in the top bins."""
    _range(lo, hi)
    _half_keys(_half(x, hi), _half(base, hi), HALF_CODES[dtype], lo, hi,
               None if keys is None else _half(keys, hi, True), _ptr(counts, np.int64, 1 << 15, True))


def half_mix(xs, is_delta, base, out, dtype: str, lower, upper, listed, start, weight, consensus, normalize,
             divisor_all, lambda_, lo, hi) -> None:
    """out[j] over [lo, hi): θ_base + λ·merge(trim(δ)) rounded op for op in ``dtype`` as mergekit does. Input i is
    δ itself where ``is_delta[i]`` (already sparsified), else θ, whose δ = round(θ − base) is kept where
    lower[i] < |δ| < upper[i], and where |δ| equals one of them at the ascending flat indices ``listed[i]``
    (from ``start[i]`` on). ``weight``: float32, already rounded to the dtype."""
    _range(lo, hi)
    k = len(xs)
    if not (len(listed) == k and lower.size == upper.size == start.size == weight.size == is_delta.size == k):
        raise ValueError("kernels: half_mix arguments do not match the inputs")
    lists = (ctypes.c_void_p * k)(*(_ptr(a, np.int64) if a.size else None for a in listed))
    counts = np.array([a.size for a in listed], dtype=np.int64)
    if np.any(start < 0) or np.any(start > counts):
        raise ValueError("kernels: half_mix start out of range")
    code = _half_mix(k, (ctypes.c_void_p * k)(*(_half(x, hi) for x in xs)), _ptr(is_delta, np.bool_, k),
                     _half(base, hi), _half(out, hi, True),
                     HALF_CODES[dtype], _ptr(lower, np.float32, k), _ptr(upper, np.float32, k), lists,
                     counts.ctypes.data, _ptr(start, np.int64, k), _ptr(weight, np.float32, k), bool(consensus),
                     bool(normalize), float(divisor_all), float(lambda_), lo, hi)
    if code:
        raise MemoryError("kernels: out of memory")
