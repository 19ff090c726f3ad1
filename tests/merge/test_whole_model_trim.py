"""TIES' trim over each whole task vector (the paper's, ``trim: model``): the exact threshold from two
histogram passes against a sort, and a merge through the engine against TIES written out over the
concatenated model."""
from __future__ import annotations

import pytest
import torch

from weightsmith.checkpoint import Checkpoint
from weightsmith.merge import merge
from weightsmith.merge.native import mixing
from weightsmith.merge.recipe import recipe_from_flags
from weightsmith.merge.native.sparsify import kept_count, whole_model_thresholds


@pytest.fixture(params=["native", "torch"])
def backend(request, monkeypatch):
    monkeypatch.setenv("WEIGHTSMITH_NATIVE", "1" if request.param == "native" else "0")
    assert (mixing.native_kernels() is not None) == (request.param == "native")
    return request.param


def planted_model(seed: int, models: int = 3, coarse: bool = True):
    """(base, [θᵢ]) per tensor: tensors of several sizes, one all-equal run of |δ| and, when ``coarse``,
    deltas on a grid (many equal |δ|), else continuous ones (none equal)."""
    g = torch.Generator().manual_seed(seed)
    sizes = [(257,), (64, 48), (3 * mixing.CHUNK + 11,), (1,)]
    out = []
    for n, size in enumerate(sizes):
        base = torch.randn(size, generator=g) * 0.02
        noise = [torch.randn(size, generator=g) * 0.03 for _ in range(models)]
        xs = [base + (torch.round(z * 1e3) / 1e3 if coarse else z) * (i + 1) for i, z in enumerate(noise)]
        if n == 1:
            xs[0] = base + 0.125  # exactly representable: one long run of equal |δ| in input 0
        out.append((base, xs))
    return out


@pytest.mark.parametrize("coarse", [True, False], ids=["ties", "continuous"])
def test_whole_model_threshold_is_the_kth_largest_of_all_magnitudes(backend, coarse):
    tensors = planted_model(0, coarse=coarse)
    passes = []

    def stream():
        passes.append(1)
        yield from tensors

    magnitudes = [torch.cat([(xs[i] - b).abs().reshape(-1) for b, xs in tensors]) for i in range(3)]
    total = magnitudes[0].numel()
    for density in ([0.3, 0.05, 0.6], [1.0, 0.0, 1e-9], [0.99, 0.5, 0.012]):
        passes.clear()
        got = whole_model_thresholds(stream, density, total)
        assert len(passes) <= 2
        for i, d in enumerate(density):
            k = kept_count(d, total)
            if k == total:
                assert got[i] == -1.0
            elif k == 0:
                assert got[i] == float("inf")
            else:
                want = magnitudes[i].sort(descending=True).values[k - 1].item()
                assert got[i] == want
                # everything at or above the threshold is kept: at least k entries, ties included
                assert int((magnitudes[i] >= got[i]).sum()) >= k > int((magnitudes[i] > got[i]).sum())


def dense_whole_model_ties(base: dict, models: list[dict], weight, density, lambda_=1.0):
    """TIES as the paper's code does it: flatten each task vector over the whole model, keep |δ| >= its
    k-th largest, elect signs, disjoint mean; then split back into tensors."""
    names = list(base)
    flat_base = torch.cat([base[n].reshape(-1) for n in names])
    trimmed = []
    for m, d in zip(models, density):
        delta = torch.cat([m[n].reshape(-1) for n in names]) - flat_base
        k = max(1, int(d * delta.numel()))
        kth = delta.abs().kthvalue(delta.numel() - k + 1).values
        trimmed.append(torch.where(delta.abs() >= kth, delta, torch.zeros_like(delta)))
    w = torch.tensor(weight).unsqueeze(1)
    weighted = torch.stack(trimmed) * w
    sign = torch.where(weighted.sum(0) >= 0, 1.0, -1.0)
    agree = weighted * sign > 0
    divisor = (w * agree).sum(0)
    mixed = (weighted * agree).sum(0) / torch.where(divisor == 0, torch.ones_like(divisor), divisor)
    flat = flat_base + lambda_ * mixed
    out, at = {}, 0
    for n in names:
        out[n] = flat[at:at + base[n].numel()].reshape(base[n].shape)
        at += base[n].numel()
    return out


def test_engine_whole_model_ties_matches_the_papers_formula(backend, sharded_zoo, tmp_path):
    names = ["ft-prose", "ft-asyncio", "ft-email"]
    weight, density = [1.0, 0.6, 0.9], [0.2, 0.35, 0.1]
    recipe = recipe_from_flags("ties", [str(sharded_zoo[n]) for n in names], str(sharded_zoo["base"]),
                               {"weight": weight, "density": density})
    merge(recipe, tmp_path / "out", device="cpu")
    base = Checkpoint(sharded_zoo["base"]).state_dict()
    want = dense_whole_model_ties(base, [Checkpoint(sharded_zoo[n]).state_dict() for n in names], weight, density)
    got = Checkpoint(tmp_path / "out")
    for name, w in want.items():
        assert torch.allclose(got.get(name), w, rtol=0, atol=1e-6), name
    # the whole-model cut is not the per-tensor one: some tensors keep far more or far less than density
    merge(recipe_from_flags("ties", [str(sharded_zoo[n]) for n in names], str(sharded_zoo["base"]),
                            {"weight": weight, "density": density}, {"trim": "tensor"}), tmp_path / "tensor", device="cpu")
    per_tensor = Checkpoint(tmp_path / "tensor")
    assert any(not torch.allclose(per_tensor.get(n), want[n], atol=1e-6) for n in want)


def test_compat_mergekit_trims_per_tensor_unless_told_otherwise(sharded_zoo, tmp_path):
    models = [str(sharded_zoo[n]) for n in ("ft-prose", "ft-asyncio")]
    base = str(sharded_zoo["base"])
    runs = {"mk": {"compat": "mergekit"}, "tensor": {"trim": "tensor", "compat": "mergekit"},
            "model": {"trim": "model", "compat": "mergekit"}, "paper": {}}
    for name, params in runs.items():
        merge(recipe_from_flags("ties", models, base, {"density": [0.3]}, params), tmp_path / name, device="cpu")
    out = {name: Checkpoint(tmp_path / name) for name in runs}
    names = out["mk"].names()
    assert all(torch.equal(out["mk"].get(n), out["tensor"].get(n)) for n in names)
    assert all(torch.equal(out["model"].get(n), out["paper"].get(n)) for n in names)
    assert not all(torch.equal(out["mk"].get(n), out["paper"].get(n)) for n in names)
    assert "trim" in (tmp_path / "paper" / "README.md").read_text()
