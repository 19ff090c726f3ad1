"""The chunked task-vector kernel against a dense, plainly written TIES / task arithmetic, on tensors
large enough for the sampled top-k bracket, several chunks, both threads and ties at the cut."""
from __future__ import annotations

import pytest
import torch

from weightsmith.merge import mixing
from weightsmith.merge.methods import task_arithmetic, ties
from weightsmith.merge.sparsify import SAMPLE, magnitude_rank


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


def planted_inputs(n: int, models: int = 3, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    base = torch.randn(n, generator=g) * 0.02
    # coarse steps make many equal |δ|, so ties straddle every top-k threshold
    deltas = [torch.round(torch.randn(n, generator=g) * 50) / 1e4 * (i + 1) for i in range(models)]
    return base, [base + d for d in deltas]


@pytest.fixture(params=[1, 2], ids=["1-thread", "2-threads"])
def threads(request, monkeypatch):
    monkeypatch.setattr(mixing, "worker_count", lambda numel: max(1, min(request.param, numel // mixing.CHUNK)))
    return request.param


@pytest.mark.parametrize("n", [5 * mixing.CHUNK + 123, 64 * SAMPLE + 7])
def test_ties_kernel_matches_dense_ties_with_ties_at_the_cut(threads, n):
    base, models = planted_inputs(n)
    weight, density = [0.5, 1.0, -0.25], [0.3, 0.11, 0.7]
    want = dense_ties(models, base, weight, density)
    got = ties([m.clone() for m in models], base.clone(), weight, density, inplace=True)
    assert torch.allclose(got, want, rtol=0, atol=1e-7)
    got = ties(models, base, weight, density, normalize=False, lambda_=0.7)
    assert torch.allclose(got, dense_ties(models, base, weight, density, normalize=False, lambda_=0.7), rtol=0, atol=1e-7)


def test_task_arithmetic_kernel_matches_the_formula(threads):
    base, models = planted_inputs(3 * mixing.CHUNK + 5, models=2, seed=1)
    got = task_arithmetic(models, base, weight=[0.3, 0.9], lambda_=1.5)
    assert torch.allclose(got, base + 1.5 * (0.3 * (models[0] - base) + 0.9 * (models[1] - base)), atol=1e-7)


@pytest.mark.parametrize("n", [1000, 64 * SAMPLE + 1])
def test_magnitude_rank_matches_a_sort(n):
    base, (x,) = planted_inputs(n, models=1, seed=2)
    mag = (x - base).abs()
    for k in (1, n // 10, n // 2, n - 3):
        threshold, above, equal = magnitude_rank(x, base, k)
        assert threshold == mag.sort(descending=True).values[k - 1].item()
        assert above == int((mag > threshold).sum()) and equal == int((mag == threshold).sum())
