"""Task-vector mixing, chunk by chunk: θ_base + λ · Σ wᵢ δᵢ, or TIES' elected-sign disjoint mean.

Each input enters as either a finished (sparsified) delta or a raw tensor with a magnitude cutoff,
so TIES' trim is applied inside the same cache-sized chunk that computes δ = θ − θ_base, elects the
sign and sums: every input is read once more after its threshold is found, and no full-size mask,
delta or weighted copy is ever allocated. Chunks are split between threads (the kernels release the
GIL), so a CPU merge uses every core. On CPU in float32 the native kernel of ``kernels`` does the
whole chunk in one fused pass; the torch kernel below is its fallback (extension not built,
``WEIGHTSMITH_NATIVE=0``) and the accelerator path, and both compute the same float32 operations in the
same order.
"""
from __future__ import annotations

import math
import os
import threading
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from functools import cache
from types import ModuleType

import numpy as np
import torch

CHUNK = 1 << 16  # elements per input per chunk on CPU: a chunk's working set stays in the L2 cache
DEVICE_CHUNK = 1 << 24  # on an accelerator a chunk only bounds the scratch memory


@dataclass(frozen=True)
class Cutoff:
    """Keep |θ − θ_base| >= ``threshold``; values equal to it only before flat index ``tie_end`` (exact top-k)."""
    threshold: float
    tie_end: int | None = None


@dataclass(frozen=True)
class Source:
    """One input, flattened: δ itself (already sparsified) when ``is_delta``, else θ, whose δ = θ − θ_base is
    formed chunk by chunk and trimmed by ``cutoff``."""
    flat: torch.Tensor
    is_delta: bool
    cutoff: Cutoff | None = None


def native_kernels() -> ModuleType | None:
    """The native CPU kernels, or None: extension not built (no C compiler at install) or ``WEIGHTSMITH_NATIVE=0``."""
    if os.environ.get("WEIGHTSMITH_NATIVE", "1") == "0":
        return None
    return _import_kernels()


_SCRATCH: list = []  # buffers a finished tensor's kernels leave to the next one, until the merge ends
_SCRATCH_LOCK = threading.Lock()


def borrow_scratch(make: Callable[[], object]) -> object:
    """A buffer a finished tensor gave back (``make()`` when none is left): reused memory needs no page faults."""
    with _SCRATCH_LOCK:
        return _SCRATCH.pop() if _SCRATCH else make()


def give_back_scratch(buffer: object) -> None:
    with _SCRATCH_LOCK:
        _SCRATCH.append(buffer)


def release_scratch() -> None:
    """Drop the buffers kept between tensors (a merge calls this when it is done)."""
    with _SCRATCH_LOCK:
        _SCRATCH.clear()


@cache
def _import_kernels() -> ModuleType | None:
    try:
        from . import kernels
    except ImportError:
        return None
    return kernels


def worker_count(numel: int) -> int:
    """Threads worth starting for ``numel`` elements: one per core, none spare for tiny tensors."""
    return max(1, min(torch.get_num_threads(), os.cpu_count() or 1, numel // CHUNK))


def parallel_ranges(numel: int, fn: Callable[[int, int], None], workers: int | None = None) -> None:
    """Run ``fn(lo, hi)`` over contiguous, chunk-aligned parts of ``range(numel)``, one per worker."""
    workers = workers or worker_count(numel)
    if workers <= 1:
        fn(0, numel)
        return
    per = -(-numel // workers)
    per = -(-per // CHUNK) * CHUNK
    bounds = [(lo, min(numel, lo + per)) for lo in range(0, numel, per)]
    with ThreadPoolExecutor(len(bounds)) as pool:
        for f in [pool.submit(fn, lo, hi) for lo, hi in bounds]:
            f.result()


def run_parallel(calls: list[Callable[[], None]]) -> None:
    """Run the calls on a thread each (all at once: callers pass one per core)."""
    if len(calls) <= 1:
        for call in calls:
            call()
        return
    with ThreadPoolExecutor(len(calls)) as pool:
        for f in [pool.submit(call) for call in calls]:
            f.result()


def _below(x: float, dtype: torch.dtype) -> float:
    """The largest ``dtype`` value below ``x``: |δ| > _below(t) keeps exactly |δ| >= t."""
    return torch.nextafter(torch.tensor(x, dtype=dtype), torch.tensor(-math.inf, dtype=dtype)).item()


def mix(sources: list[Source], base: torch.Tensor, out: torch.Tensor, weight: list[float], consensus: bool,
        normalize: bool, lambda_: float) -> torch.Tensor:
    """Write θ_base + λ · merge(δ) into ``out`` (which may be ``base`` itself); all tensors flat, same device.

    ``consensus``: elected sign = sign(Σ wᵢδᵢ) (a zero sum elects +); each position sums the weighted
    deltas that agree with it, and ``normalize`` divides by the weights of those (1 where none agrees).
    Otherwise the weighted sum, divided by Σ wᵢ when ``normalize``. The chunk kernel uses float
    arithmetic only: torch's bool kernels (compare, where, masked ops) are several times slower on CPU.
    """
    if base.device.type == "cpu" and base.dtype == torch.float32 and all(s.flat.dtype == torch.float32 for s in sources):
        kernels = native_kernels()
        if kernels is not None:
            return _mix_native(kernels, sources, base, out, weight, consensus, normalize, lambda_)
    return _mix_torch(sources, base, out, weight, consensus, normalize, lambda_)


class _Trim:
    """Each input's cutoff applied to a chunk of its deltas (hardshrink keeps |δ| > λ)."""

    def __init__(self, sources: list[Source], dtype: torch.dtype):
        self.cuts = [s.cutoff for s in sources]
        self.inclusive = [_below(c.threshold, dtype) if c is not None and c.threshold >= 0 else None
                          for c in self.cuts]

    def __call__(self, d: torch.Tensor, i: int, s: int, e: int) -> None:
        """Zero, in place, the deltas of the chunk [s, e) that input i's cutoff drops."""
        cut = self.cuts[i]
        if cut is None:
            return
        if cut.threshold == math.inf:
            d.zero_()
        elif cut.threshold >= 0:
            split = e if cut.tie_end is None else min(e, max(s, cut.tie_end))
            for part, lam in ((d[: split - s], self.inclusive[i]), (d[split - s:], cut.threshold)):
                if part.numel():
                    torch.ops.aten.hardshrink.out(part, lam, out=part)


def _mix_torch(sources: list[Source], base: torch.Tensor, out: torch.Tensor, weight: list[float], consensus: bool,
               normalize: bool, lambda_: float) -> torch.Tensor:
    """``mix`` in torch, chunk by chunk on each thread's range."""
    n, k = base.numel(), len(sources)
    total_weight = sum(weight) if abs(sum(weight)) >= 1e-8 else 1.0
    unit = all(w == 1.0 for w in weight)
    wcol = torch.tensor(weight, dtype=base.dtype, device=base.device)
    trim = _Trim(sources, base.dtype)
    cpu = base.device.type == "cpu"
    chunk = CHUNK if cpu else DEVICE_CHUNK

    def run(lo: int, hi: int) -> None:
        # every buffer is allocated once per thread: a fresh chunk-sized tensor per op would go through
        # mmap/munmap and page faults, which serialise the threads in the kernel
        width = min(chunk, hi - lo)
        d_buf = torch.empty((k, width), dtype=base.dtype, device=base.device)
        v_buf = torch.empty((3, width), dtype=base.dtype, device=base.device)
        for s in range(lo, hi, chunk):
            e = min(hi, s + chunk)
            dd = d_buf[:, : e - s]
            b = base[s:e]
            for i, src in enumerate(sources):
                if src.is_delta:
                    dd[i].copy_(src.flat[s:e])
                else:
                    torch.sub(src.flat[s:e], b, out=dd[i])
                trim(dd[i], i, s, e)
            if not unit:
                dd.mul_(wcol.unsqueeze(1))
            mixed = _combine(dd, v_buf[:, : e - s], weight, consensus, normalize, total_weight)
            if lambda_ != 1:
                mixed *= lambda_
            torch.add(b, mixed, out=out[s:e])

    parallel_ranges(n, run, None if cpu else 1)
    return out


def _combine(dd: torch.Tensor, buffers: torch.Tensor, weight: list[float], consensus: bool, normalize: bool,
             total_weight: float) -> torch.Tensor:
    """One chunk's merged delta from its (weighted, trimmed) deltas ``dd`` [k, width], in ``buffers`` [3, width]."""
    total, elected, divisor = buffers
    torch.sum(dd, 0, out=total)
    if not consensus:
        return total.div_(total_weight) if normalize else total
    # elected sign ±1 (a zero sum elects +); agreeing deltas are those with δ·sign > 0
    torch.sign(total, out=elected).add_(0.5).sign_()
    agreeing = dd.mul_(elected).relu_()
    mixed = torch.sum(agreeing, 0, out=total).mul_(elected)  # exact: multiplying by ±1
    if normalize:
        # Σ of the agreeing inputs' weights, added in input order as the native kernel does
        signs = agreeing.sign_()
        divisor.zero_()
        for i in range(dd.shape[0]):
            divisor.add_(signs[i], alpha=weight[i])
        divisor += torch.sign(divisor, out=elected).abs_().neg_().add_(1)  # none agrees: divide by 1
        mixed /= divisor
    return mixed


def flat_array(t: torch.Tensor) -> np.ndarray:
    """A CPU tensor as the flat, C-contiguous numpy array the native kernels take (a view when it can be)."""
    return np.ascontiguousarray(t.detach().reshape(-1).numpy())


def _mix_native(kernels: ModuleType, sources: list[Source], base: torch.Tensor, out: torch.Tensor,
                weight: list[float], consensus: bool, normalize: bool, lambda_: float) -> torch.Tensor:
    """``mix`` by the native kernel: float32 CPU tensors, same arithmetic as the torch kernel."""
    n = base.numel()

    xs = tuple(flat_array(s.flat) for s in sources)
    cuts = [s.cutoff for s in sources]
    threshold = np.array([c.threshold if c is not None else -1.0 for c in cuts], dtype=np.float32)
    tie_end = np.array([n if c is None or c.tie_end is None else c.tie_end for c in cuts], dtype=np.int64)
    is_delta = np.array([s.is_delta for s in sources], dtype=np.bool_)
    total = sum(weight)
    total_weight = np.float32(total if abs(total) >= 1e-8 else 1.0)
    b, o = flat_array(base), out.detach().numpy()
    if not o.flags.c_contiguous:
        raise ValueError("mix: out must be contiguous")
    args = (is_delta, threshold, tie_end, np.array(weight, dtype=np.float32), b, o)
    flags = (consensus, normalize, total_weight, np.float32(lambda_), all(w == 1.0 for w in weight))
    parallel_ranges(n, lambda lo, hi: kernels.mix_range(xs, *args, lo, hi, *flags))
    return out
