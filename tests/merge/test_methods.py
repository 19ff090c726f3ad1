"""Closed forms and hand-computed cases for the merge methods (pure tensor functions)."""
from __future__ import annotations

import math

import pytest
import torch

from weightsmith.merge.methods.average import linear, model_stock
from weightsmith.merge.methods.dare import dare_linear, dare_ties
from weightsmith.merge.methods.mwa import mwa_weights
from weightsmith.merge.methods.spherical import slerp
from weightsmith.merge.methods.task_arithmetic import task_arithmetic
from weightsmith.merge.methods.ties import ties
from weightsmith.merge.settings import evaluate_setting
from weightsmith.merge.native.sparsify import breadcrumbs_mask, kth_smallest, ties_trim


def test_ties_hand_computed_with_sign_ties_and_zeros():
    base = torch.zeros(6)
    # Columns: clear + majority; clear − majority; sum exactly 0 (elects +); all zero; trimmed away; mixed.
    a = torch.tensor([3.0, -2.0, 1.0, 0.0, 0.1, 4.0])
    b = torch.tensor([1.0, -3.0, -1.0, 0.0, 0.2, -1.0])
    c = torch.tensor([-1.0, 1.0, 0.0, 0.0, -0.3, -2.0])
    # density 0.5 keeps the 3 largest |δ| of each model:
    #   a: 4, 3, -2       b: -3, 1, -1 (ties at |1| broken arbitrarily => use 4 entries below)
    out = ties([a, b, c], base, weight=[1.0, 1.0, 1.0], density=[4 / 6, 4 / 6, 4 / 6])
    # trimmed (top 4 |δ|): a -> [3,-2,1,0,0,4]; b -> [1,-3,-1,0,0,-1]; c -> [-1,1,0,0,-0.3,-2]
    # elected sign: col0 3+1-1=3 (+); col1 -4 (−); col2 0 (+); col3 0 (+); col4 -0.3 (−); col5 1 (+)
    expected = torch.tensor([(3 + 1) / 2, (-2 - 3) / 2, 1.0, 0.0, -0.3, 4.0])
    assert torch.allclose(out, expected)


def test_ties_trim_keeps_exact_top_k_and_at_least_one():
    x = torch.tensor([0.5, -4.0, 2.0, -1.0, 3.0])
    assert torch.equal(ties_trim(x, 0.4), torch.tensor([0.0, -4.0, 0.0, 0.0, 3.0]))
    assert torch.count_nonzero(ties_trim(x, 0.01)) == 1
    assert torch.equal(ties_trim(x, 0.0), torch.zeros(5))


def test_kth_smallest_matches_sorting():
    x = torch.randn(37, 53)
    assert kth_smallest(x, 100) == x.reshape(-1).sort().values[99]
    rows = kth_smallest(x, 7, dim=1)
    assert torch.equal(rows.squeeze(1), x.sort(dim=1).values[:, 6])


def test_dare_expectation_is_task_arithmetic_and_kept_fraction_is_density():
    torch.manual_seed(0)
    base = torch.randn(200_000)
    models = [base + torch.randn(200_000) * 0.1 for _ in range(2)]
    want = task_arithmetic(models, base, weight=[0.6, 0.4])
    gens = [torch.Generator().manual_seed(s) for s in (1, 2)]
    density = 0.3
    one = dare_linear([models[0]], base, weight=[1.0], density=[density], generators=[gens[0]])
    kept = torch.count_nonzero(one - base).item() / base.numel()
    assert abs(kept - density) < 4 * math.sqrt(density * (1 - density) / base.numel())
    runs = torch.stack([dare_linear(models, base, weight=[0.6, 0.4], density=[density] * 2,
                                    generators=[torch.Generator().manual_seed(10 * r + i) for i in range(2)])
                        for r in range(40)])
    err = (runs.mean(0) - want)
    # per entry: Var = sum w_i^2 δ_i^2 (1-d)/d / runs; compare the mean squared error with its expectation
    var = sum(w ** 2 * (m - base) ** 2 for w, m in zip((0.6, 0.4), models)) * (1 - density) / density / 40
    ratio = (err ** 2).mean() / var.mean()
    assert 0.9 < ratio < 1.1
    assert abs(err.mean().item()) < 5 * math.sqrt(var.mean().item() / base.numel())


def test_dare_l1_rescale_matches_norm_and_density_one_is_task_arithmetic():
    base = torch.zeros(1000)
    m = torch.randn(1000)
    g = torch.Generator().manual_seed(0)
    out = dare_ties([m], base, weight=[1.0], density=[0.5], rescale="l1", generators=[g])
    assert torch.isclose(out.abs().sum(), m.abs().sum(), rtol=1e-5)
    assert torch.equal(dare_ties([m], base, weight=[1.0], density=[1.0]), m)


def test_breadcrumbs_per_row_band_gamma_zero_and_tiny_tensors():
    d = torch.tensor([[1.0, 2.0, 3.0, 4.0, 5.0], [50.0, 10.0, 30.0, 20.0, 40.0]])
    mask = breadcrumbs_mask(d, density=0.4, gamma=0.2)
    assert mask.tolist() == [[False, False, True, True, False], [False, False, True, False, True]]
    # per tensor: drop the 2 largest (gamma 0.2 of 10), keep the next 4
    flat = breadcrumbs_mask(d, density=0.4, gamma=0.2, per_row=False)
    assert d[flat].sort().values.tolist() == [5.0, 10.0, 20.0, 30.0]
    assert breadcrumbs_mask(d, 0.4, 0.0)[0].tolist() == [False, False, False, True, True]
    tiny = torch.tensor([0.3, -0.1])
    assert breadcrumbs_mask(tiny, 0.15, 0.01).sum() == 1  # the paper mode keeps a band even here


def test_slerp_endpoints_and_orthogonal_midpoint():
    a, b = torch.tensor([1.0, 0.0]), torch.tensor([0.0, 1.0])
    assert torch.allclose(slerp([b], a, 0.0), a) and torch.allclose(slerp([b], a, 1.0), b)
    assert torch.allclose(slerp([b], a, 0.5), torch.tensor([math.sqrt(0.5)] * 2))
    assert torch.allclose(slerp([2 * a], a, 0.5), 1.5 * a)  # collinear: plain lerp


def test_model_stock_closed_form():
    base = torch.zeros(4)
    w1, w2 = torch.tensor([1.0, 0, 0, 0]), torch.tensor([0.0, 1, 0, 0])  # cos = 0 -> t = 0 -> base
    assert torch.allclose(model_stock([w1, w2], base), base)
    same = model_stock([w1, w1.clone()], base)  # cos = 1 -> t = 1 -> the average
    assert torch.allclose(same, w1)


def test_linear_weights_and_normalize():
    x, y = torch.ones(3), 3 * torch.ones(3)
    assert torch.allclose(linear([x, y], [1.0, 3.0]), 2.5 * torch.ones(3))
    assert torch.allclose(linear([x, y], [1.0, 3.0], normalize=False), 10 * torch.ones(3))


def test_mwa_weights_formula():
    assert mwa_weights([1.0, 2.0, 3.0], 0.0) == pytest.approx([1 / 3] * 3)
    assert mwa_weights([1.0, 3.0], 2.0) == pytest.approx([0.1, 0.9])
    assert mwa_weights([1.0, 2.0], 500.0)[1] == pytest.approx(1.0)


def test_gradients_and_filters_follow_mergekit():
    assert evaluate_setting([0.0, 1.0], "x", 0.25, "w") == pytest.approx(0.25)
    assert evaluate_setting([0.0, 1.0, 0.0], "x", 0.75, "w") == pytest.approx(0.5)
    flt = [{"filter": "self_attn", "value": 0.5}, {"value": [0.1, 0.3]}]
    assert evaluate_setting(flt, "model.layers.0.self_attn.q_proj.weight", 1.0, "w") == 0.5
    assert evaluate_setting(flt, "model.layers.3.mlp.up_proj.weight", 1.0, "w") == pytest.approx(0.3)
