"""The chunked task-vector kernels (native and torch) against a dense, plainly written TIES / task
arithmetic, on tensors large enough for the sampled top-k bracket, several chunks, both threads and
ties at the cut; and the native kernel against the torch one, bit for bit."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from weightsmith.merge.methods.task_arithmetic import task_arithmetic
from weightsmith.merge.methods.ties import ties
from weightsmith.merge.native import mixing, sparsify
from weightsmith.merge.native.sparsify import BRACKETED, magnitude_rank


def dense_ties(tensors, base, weight, density, normalize=True, lambda_=1.0):
    """TIES written out over whole tensors: exact top-k by a stable sort (ties kept in index order)."""
    trimmed = []
    for x, d in zip(tensors, density):
        delta = (x - base).reshape(-1)
        k = max(1, int(d * delta.numel()))
        order = torch.sort(delta.abs(), descending=True, stable=True).indices[:k]
        keep = torch.zeros_like(delta)
        keep[order] = delta[order]
        trimmed.append(keep)
    w = torch.tensor(weight).unsqueeze(1)
    weighted = torch.stack(trimmed) * w
    elected = torch.where(weighted.sum(0) >= 0, 1.0, -1.0)
    agree = torch.where(elected > 0, weighted > 0, weighted < 0)
    mixed = (weighted * agree).sum(0)
    if normalize:
        divisor = (w * agree).sum(0)
        mixed = mixed / torch.where(divisor == 0, torch.ones_like(divisor), divisor)
    return base + lambda_ * mixed.reshape(base.shape)


def planted_inputs(n: int, models: int = 3, seed: int = 0, pairs: bool = False):
    g = torch.Generator().manual_seed(seed)
    base = torch.randn(n, generator=g) * 0.02
    # coarse steps make many equal |δ|, so ties straddle every top-k threshold; with ``pairs`` they come
    # in adjacent pairs, so the entry right after a cut through the ties is often a tie too
    deltas = [torch.round(torch.randn(n, generator=g) * 50) / 1e4 * (i + 1) for i in range(models)]
    if pairs:
        deltas = [d[: (n + 1) // 2].repeat_interleave(2)[:n] for d in deltas]
        base = torch.zeros(n)  # so that θ − base gives back the planted δ exactly
    return base, [base + d for d in deltas]


@pytest.fixture(params=[1, 2], ids=["1-thread", "2-threads"])
def threads(request, monkeypatch):
    monkeypatch.setattr(mixing, "worker_count", lambda numel: max(1, min(request.param, numel // mixing.CHUNK)))
    return request.param


@pytest.fixture
def native(monkeypatch):
    """The native kernels, switched on. The dev install builds them, so their absence is a failure."""
    monkeypatch.setenv("WEIGHTSMITH_NATIVE", "1")
    kernels = mixing.native_kernels()
    assert kernels is not None, "weightsmith.merge.native._kernels was not built (is a C compiler installed?)"
    return kernels


@pytest.fixture(params=["native", "torch"])
def backend(request, monkeypatch):
    if request.param == "native":
        request.getfixturevalue("native")
    else:
        monkeypatch.setenv("WEIGHTSMITH_NATIVE", "0")
        assert mixing.native_kernels() is None
    return request.param


@pytest.mark.parametrize("n", [5 * mixing.CHUNK + 123, 4 * BRACKETED + 7])
def test_ties_kernel_matches_dense_ties_with_ties_at_the_cut(threads, backend, n):
    base, models = planted_inputs(n)
    weight, density = [0.5, 1.0, -0.25], [0.3, 0.11, 0.7]
    want = dense_ties(models, base, weight, density)
    got = ties([m.clone() for m in models], base.clone(), weight, density, inplace=True)
    assert torch.allclose(got, want, rtol=0, atol=1e-7)
    got = ties(models, base, weight, density, normalize=False, lambda_=0.7)
    assert torch.allclose(got, dense_ties(models, base, weight, density, normalize=False, lambda_=0.7), rtol=0, atol=1e-7)


def test_task_arithmetic_kernel_matches_the_formula(threads, backend):
    base, models = planted_inputs(3 * mixing.CHUNK + 5, models=2, seed=1)
    got = task_arithmetic(models, base, weight=[0.3, 0.9], lambda_=1.5)
    assert torch.allclose(got, base + 1.5 * (0.3 * (models[0] - base) + 0.9 * (models[1] - base)), atol=1e-7)


@pytest.mark.parametrize("n", [1000, 4 * BRACKETED + 1])
def test_magnitude_rank_matches_a_sort(backend, n):
    base, (x,) = planted_inputs(n, models=1, seed=2)
    mag = (x - base).abs()
    for k in (1, n // 10, n // 2, n - 3):
        threshold, above, equal = magnitude_rank(x, base, k)
        assert threshold == mag.sort(descending=True).values[k - 1].item()
        assert above == int((mag > threshold).sum()) and equal == int((mag == threshold).sum())


def _mix_both_ways(monkeypatch, sources, base, **kw):
    outs = []
    for flag in ("1", "0"):
        monkeypatch.setenv("WEIGHTSMITH_NATIVE", flag)
        outs.append(mixing.mix(sources, base, torch.empty_like(base), **kw))
    return outs


@pytest.mark.parametrize("consensus", [True, False])
@pytest.mark.parametrize("normalize", [True, False])
def test_native_mix_is_bitwise_equal_to_the_torch_kernel(monkeypatch, native, threads, consensus, normalize):
    n = 3 * mixing.CHUNK + 777
    base, (a, b, c) = planted_inputs(n, models=3, seed=3)
    thresholds = [(a - base).abs().median().item(), (b - base).abs().quantile(0.9).item()]
    tied = ((a - base).abs() == thresholds[0]).nonzero().squeeze(1)
    cut = int(tied[tied.numel() // 2])  # a tied entry sits right at the cut: it is dropped, the one before kept
    sources = [mixing.Source(a, False, mixing.Cutoff(thresholds[0], tie_end=cut)),
               mixing.Source(b, False, mixing.Cutoff(thresholds[1])),
               mixing.Source(c - base, True),  # an already sparsified delta
               mixing.Source(a, False, mixing.Cutoff(-1.0)),  # keeps all
               mixing.Source(b, False, mixing.Cutoff(float("inf")))]  # keeps none
    for weight, lambda_ in (([1.0] * 5, 1.0), ([1.0] * 5, 0.6), ([0.5, 1.0, -0.25, 2.0, 0.3], 1.3)):
        fast, plain = _mix_both_ways(monkeypatch, sources, base, weight=weight, consensus=consensus,
                                     normalize=normalize, lambda_=lambda_)
        assert torch.equal(fast, plain)
        assert not torch.equal(fast, base)


def test_native_mix_writes_in_place_over_the_base(native):
    base, models = planted_inputs(2 * mixing.CHUNK + 3, models=2, seed=4)
    want = ties(models, base, [1.0, 1.0], [0.4, 0.4])
    got = ties([m.clone() for m in models], base.clone(), [1.0, 1.0], [0.4, 0.4], inplace=True)
    assert torch.equal(got, want)


def test_fused_ties_matches_dense_ties(native, threads, monkeypatch):
    n = 2 * BRACKETED + 11
    base, models = planted_inputs(n, models=4, seed=5, pairs=True)
    for weight, density, normalize, lambda_ in (([1.0] * 4, [0.3, 0.2, 0.5, 0.05], True, 1.0),
                                                ([0.5, 1.0, -0.25, 0.8], [0.3, 1.0, 0.1, 0.6], True, 0.7),
                                                ([0.5, 1.0, -0.25, 0.8], [0.3, 1.0, 0.1, 0.6], False, 0.7)):
        monkeypatch.setenv("WEIGHTSMITH_NATIVE", "1")
        got = sparsify.ties_fused(models, base, weight, density, normalize, lambda_, mergekit=False)
        assert got is not None
        assert torch.allclose(got, dense_ties(models, base, weight, density, normalize, lambda_), rtol=0, atol=1e-7)
        monkeypatch.setenv("WEIGHTSMITH_NATIVE", "0")  # the two-pass torch path: the very same bits
        assert torch.equal(got, ties(models, base, weight, density, normalize=normalize, lambda_=lambda_))
    # density 0 keeps nothing: the same as leaving that model out
    monkeypatch.setenv("WEIGHTSMITH_NATIVE", "1")
    without = sparsify.ties_fused(models[:3], base, [1.0] * 3, [0.3, 0.2, 0.5], True, 1.0, mergekit=False)
    assert torch.equal(sparsify.ties_fused(models, base, [1.0] * 4, [0.3, 0.2, 0.5, 0.0], True, 1.0, False), without)


def test_fused_ties_steps_aside_where_it_cannot_be_exact(native, monkeypatch):
    n = 2 * BRACKETED + 11
    base, models = planted_inputs(n, models=2, seed=6)
    args = ([1.0, 1.0], [0.3, 0.4], True, 1.0)
    want = dense_ties(models, base, *args[:3])
    for wrong in ((0.0, 1e-9, 1e-6), (0.0, math.inf, 1e-6)):  # a bracket that misses; one that overflows
        monkeypatch.setattr(sparsify, "_sample_bracket", lambda *a, wrong=wrong: wrong)
        assert sparsify.ties_fused(models, base, *args, mergekit=False) is None
        assert torch.allclose(ties(models, base, *args[:2], normalize=True), want, rtol=0, atol=1e-7)


@pytest.mark.parametrize("density", [0.1, 0.3, 0.7])
def test_fused_ties_on_bfloat16_weights(native, density):
    """bfloat16 checkpoints give a few thousand distinct |δ| over millions of entries: long runs of ties."""
    n = 2 * BRACKETED + 11
    g = torch.Generator().manual_seed(7)
    base = (torch.randn(n, generator=g) * 0.02).bfloat16().float()
    models = [(base + torch.randn(n, generator=g) * 0.001 * (i + 1)).bfloat16().float() for i in range(3)]
    got = sparsify.ties_fused(models, base, [1.0] * 3, [density] * 3, True, 1.0, mergekit=False)
    assert got is not None
    assert torch.allclose(got, dense_ties(models, base, [1.0] * 3, [density] * 3), rtol=0, atol=1e-7)


def test_native_wrappers_refuse_arrays_they_would_overrun(native):
    """A wrong dtype, a strided view, a short array or a bad range raises instead of reading stray memory."""
    x, base, out = np.ones(100, np.float32), np.zeros(100, np.float32), np.empty(100, np.float32)
    flags = (np.zeros(1, np.bool_), np.full(1, -1.0, np.float32), np.full(1, 100, np.int64), np.ones(1, np.float32))
    native.mix_range((x,), *flags, base, out, 0, 100, True, False, np.float32(1), np.float32(1), True)
    assert np.array_equal(out, x)
    for xs, o, lo, hi in (((x.astype(np.float64),), out, 0, 100), ((np.ones(200, np.float32)[::2],), out, 0, 100),
                          ((x[:50],), out, 0, 100), ((x,), out[:99], 0, 100), ((x,), out, 10, 5)):
        with pytest.raises((TypeError, ValueError)):
            native.mix_range(xs, *flags, base, o, lo, hi, True, False, np.float32(1), np.float32(1), True)
    with pytest.raises(ValueError):
        native.ties_fixup((x,), base, out, flags[1], flags[2], flags[3], True, 1.0, True, np.array([100], np.int64))
    frozen = out.copy()
    frozen.flags.writeable = False
    with pytest.raises(ValueError):
        native.mix_range((x,), *flags, base, frozen, 0, 100, True, False, np.float32(1), np.float32(1), True)
