"""PLeaS: closed forms at the ends of the width range and the least-squares solve itself."""
from __future__ import annotations

import copy

import numpy as np
import pytest
import torch

from models import ResNet, mlp
from weightsmith.errors import WeightsmithError
from weightsmith.merge.pleas import MERGED, ONLY_A, ONLY_B, merge_counts, pleas_least_squares, pleas_modules
from weightsmith.merge.align import spec_for


def _batches(shape, n=3, rows=200):
    return [torch.randn(rows, *shape) for _ in range(n)]


@pytest.mark.parametrize("inputs", ["merged", "original"])
def test_width_two_mlp_is_the_ensemble_of_both_models(inputs):
    a, b = mlp((16, 48, 32, 6), seed=0).eval(), mlp((16, 48, 32, 6), seed=1).eval()
    merged, report = pleas_modules(a, b, _batches((16,)), width=2.0, ridge=1e-8, inputs=inputs)
    assert set(report["merged_units"].values()) == {0}
    x = torch.randn(50, 16)
    ensemble = (a(x) + b(x)) / 2
    assert torch.allclose(merged(x), ensemble, atol=1e-4)
    assert not torch.allclose(a(x), ensemble, atol=1e-2)


def test_width_one_on_identical_models_gives_the_model_back():
    for a, shape in ((mlp((16, 48, 32, 6)).eval(), (16,)), (ResNet(width=4, classes=3).eval(), (1, 8, 8))):
        merged, _ = pleas_modules(a, copy.deepcopy(a), _batches(shape), width=1.0, ridge=1e-8)
        x = torch.randn(20, *shape)
        assert torch.allclose(merged(x), a(x), atol=1e-3)
        assert sum(p.numel() for p in merged.parameters()) == sum(p.numel() for p in a.parameters())


def test_intermediate_width_gets_its_unit_count_and_beats_the_plain_average_fit():
    a, b = mlp((16, 40, 40, 6), seed=0).eval(), mlp((16, 40, 40, 6), seed=1).eval()
    data = _batches((16,))
    merged, report = pleas_modules(a, b, data, width=1.5)
    assert report["units"] == {"0": 60, "2": 60} and report["merged_units"] == {"0": 20, "2": 20}
    plain, _ = pleas_modules(a, b, data, width=1.0, least_squares=False)
    x = torch.randn(200, 16)
    ensemble = (a(x) + b(x)) / 2
    assert (merged(x) - ensemble).pow(2).mean() < (plain(x) - ensemble).pow(2).mean()


def test_least_squares_matches_a_direct_normal_equation_solve():
    gen = torch.Generator().manual_seed(0)
    x, y = torch.randn(300, 7, generator=gen, dtype=torch.float64), torch.randn(300, 5, generator=gen, dtype=torch.float64)
    gram, cross = x.T @ x, x.T @ y
    in_kind = torch.tensor([MERGED, MERGED, ONLY_A, ONLY_A, ONLY_B, ONLY_B, MERGED])
    out_kind = torch.tensor([MERGED, ONLY_A, ONLY_A, ONLY_B, MERGED])
    w = pleas_least_squares(gram, cross, in_kind, out_kind, ridge=0.0).numpy()
    xn, yn = x.numpy(), y.numpy()
    for r, kind in enumerate(out_kind.tolist()):
        cols = [c for c, k in enumerate(in_kind.tolist()) if kind == MERGED or k in (MERGED, kind)]
        direct = np.linalg.lstsq(xn[:, cols], yn[:, r], rcond=None)[0]
        np.testing.assert_allclose(w[r, cols], direct, atol=1e-10)
        assert np.all(w[r, [c for c in range(7) if c not in cols]] == 0)
    lam = 0.1
    ridge = pleas_least_squares(gram, cross, torch.zeros(7, dtype=torch.long), torch.zeros(5, dtype=torch.long), lam)
    expected = np.linalg.solve(gram.numpy() + lam * np.diag(gram.numpy()).mean() * np.eye(7), cross.numpy()).T
    np.testing.assert_allclose(ridge.numpy(), expected, atol=1e-10)


def test_width_rule_and_range():
    spec = spec_for(mlp((16, 40, 30, 6)))
    assert merge_counts(spec, 1.0) == {"0": 40, "2": 30}
    assert merge_counts(spec, 1.2) == {"0": 32, "2": 24}
    assert merge_counts(spec, 2.0) == {"0": 0, "2": 0}
    with pytest.raises(WeightsmithError, match=r"^width: 2.5 is out of range; it must be in \[1, 2\]$"):
        merge_counts(spec, 2.5)


@pytest.mark.parametrize("kind", ["resnet", "mlp"])
def test_a_stopping_capture_records_the_same_activations_and_ends_the_pass(kind):
    from weightsmith.merge.align.capture import capture, forward

    if kind == "resnet":  # layers whose target is their BatchNorm's output
        model, x = ResNet(width=8, seed=0).eval(), torch.randn(4, 1, 8, 8)
        last = model.fc
    else:
        model, x = mlp((16, 48, 32, 6), seed=0).eval(), torch.randn(4, 16)
        last = model[-1]
    spec = spec_for(model)
    for layer in (spec.layers[0], spec.layers[len(spec.layers) // 2]):
        with capture(model, [layer], raw=True) as full:
            assert forward(model, x) is not None
        calls = []
        handle = last.register_forward_hook(lambda *_: calls.append(1))  # the head runs last
        with capture(model, [layer], raw=True, stop=True) as early:
            assert forward(model, x) is None
        handle.remove()
        assert not calls
        assert all(torch.equal(a, b) for a, b in zip(full[layer.module], early[layer.module]))
