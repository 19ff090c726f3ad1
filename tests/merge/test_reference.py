"""Every task-vector fast path against its method's reference (merge/reference.py: mergekit's arithmetic,
written plainly), and the sort-free tie order against torch.sort itself.

The fast paths: the torch mixing kernel, the native one, the fused native TIES (large tensors), the
cutoff path and the trim-and-sort path; each must equal the reference bit for bit under compat: mergekit,
including inputs whose magnitudes tie at the top-k cut.
"""
from __future__ import annotations

import numpy as np
import pytest
import torch

from weightsmith.merge.methods import reference
from weightsmith.merge.methods import ties as methods
from weightsmith.merge.native import mixing, sparsify
from weightsmith.merge.registry import all_methods


@pytest.fixture(params=["native", "torch"])
def backend(request, monkeypatch):
    monkeypatch.setenv("WEIGHTSMITH_NATIVE", "1" if request.param == "native" else "0")
    assert (mixing.native_kernels() is None) == (request.param == "torch")
    return request.param


def tied_inputs(n: int, seed: int, levels: int = 40):
    """A base and three inputs whose deltas take few distinct values: many ties at every cut."""
    g = torch.Generator().manual_seed(seed)
    base = torch.randn(n, generator=g) * 0.02
    models = [base + (torch.randint(-levels, levels + 1, (n,), generator=g).float() / (levels * 50)) for _ in range(3)]
    return base, models


def sorted_band(x: torch.Tensor, start: int, count: int, descending: bool) -> torch.Tensor:
    mask = torch.zeros(x.numel(), dtype=torch.bool)
    mask[torch.sort(x.reshape(-1).float(), descending=descending).indices[start:start + count]] = True
    return mask.reshape(x.shape)


@pytest.mark.parametrize("seed", range(6))
def test_tie_order_replay_equals_torch_sort(seed, backend):
    g = torch.Generator().manual_seed(seed)
    for _ in range(20):
        n = int(torch.randint(17, 40_000, (1,), generator=g))
        x = torch.randint(0, int(torch.randint(2, 300, (1,), generator=g)), (n,), generator=g).float()
        start = int(torch.randint(0, n, (1,), generator=g))
        count = int(torch.randint(1, n - start + 1, (1,), generator=g))
        for desc in (True, False):
            assert torch.equal(sparsify._sorted_band(x, start, count, desc), sorted_band(x, start, count, desc))


@pytest.mark.parametrize("seed", range(3))
def test_float_replay_follows_the_ties_by_index_or_by_list(seed):
    """Float keys: the index-array replay, the tied-keys list (lean) and torch.sort give one order of ties."""
    kernels = mixing.native_kernels()
    g = torch.Generator().manual_seed(seed)
    for _ in range(10):
        n = int(torch.randint(17, 60_000, (1,), generator=g))
        x = torch.randint(0, int(torch.randint(2, 2000, (1,), generator=g)), (n,), generator=g).float()
        picks = sorted({float(x[int(torch.randint(0, n, (1,), generator=g))]) for _ in range(2)})
        for desc in (True, False):
            order = torch.sort(x, descending=desc).indices.numpy()
            want = [order[x.numpy()[order] == v] for v in picks]
            for got in (kernels.sort_ties(x.numpy(), desc, picks, lean=True),
                        kernels.sort_ties(x.numpy().copy(), desc, picks, owned=True)):
                assert all(np.array_equal(w, t) for w, t in zip(want, got))


def test_the_replay_is_checked_against_this_torch():
    kernels = mixing.native_kernels()
    assert kernels is not None and sparsify._replay_agrees(kernels)


def _mergekit_params(name: str, n_inputs: int) -> dict:
    method = all_methods()[name]
    kw = {}
    for p in method.params:
        if p.keyword is None:
            continue
        value = p.mergekit if p.mergekit is not None else p.default
        if p.name == "rescale" and name.startswith("dare"):
            value = "l1"
        kw[p.keyword] = [value] * n_inputs if p.scope == "model" else value
    kw["weight"] = [1.0, 0.6, -0.3][:n_inputs]
    if "compat" in kw:
        kw["compat"] = "mergekit"
    if "density" in kw:
        kw["density"] = [0.3, 0.55, 0.8][:n_inputs]
    if "gamma" in kw:
        kw["gamma"] = [0.02, 0.1, 0.0][:n_inputs]
    if "lambda_" in kw:
        kw["lambda_"] = 0.9
    return kw


TASK_VECTOR = ["task_arithmetic", "ties", "breadcrumbs", "breadcrumbs_ties"]


@pytest.mark.parametrize("name", TASK_VECTOR)
@pytest.mark.parametrize("n", [5000, 2 * sparsify.BRACKETED + 11])
@pytest.mark.parametrize("normalize", [True, False])
def test_fast_paths_equal_the_reference_under_compat_mergekit(name, n, normalize, backend):
    base, models = tied_inputs(n, seed=n % 97)
    kw = _mergekit_params(name, 3)
    kw["normalize"] = normalize
    method = all_methods()[name]
    want = method.reference([m.clone() for m in models], base.clone(), **kw)
    got = method.fn([m.clone() for m in models], base.clone(), inplace=True, **kw)
    assert torch.equal(got, want), f"{int((got != want).sum())} of {n} differ"


def test_fused_ties_keeps_mergekits_choice_among_ties(monkeypatch):
    """The fused native TIES meets ties at every cut and must keep the ones mergekit's sort keeps."""
    n = 2 * sparsify.BRACKETED + 5
    base, models = tied_inputs(n, seed=3, levels=12)
    fused = []
    original = sparsify.ties_fused
    monkeypatch.setattr(methods, "ties_fused", lambda *a, **k: fused.append(original(*a, **k)) or fused[-1])
    kw = _mergekit_params("ties", 3)
    got = methods.ties([m.clone() for m in models], base.clone(), inplace=True, **kw)
    assert fused and fused[0] is not None, "the fused path was not taken"
    # the oracle: the reference with its band chosen by a real sort
    monkeypatch.setattr(sparsify, "_replay_agrees", lambda kernels: False)
    want = reference.ties([m.clone() for m in models], base.clone(), **kw)
    assert torch.equal(got, want)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_reference_picks_ties_as_a_sort(dtype, monkeypatch):
    base, models = tied_inputs(50_000, seed=5)
    base, models = base.to(dtype), [m.to(dtype) for m in models]
    for name in ("ties", "breadcrumbs_ties"):
        kw = _mergekit_params(name, 3)
        got = all_methods()[name].reference([m.clone() for m in models], base.clone(), **kw)
        with monkeypatch.context() as m:
            m.setattr(sparsify, "_replay_agrees", lambda kernels: False)
            want = all_methods()[name].reference([x.clone() for x in models], base.clone(), **kw)
        assert got.dtype == dtype and torch.equal(got, want), name


def test_every_task_vector_method_has_a_reference():
    for name, m in all_methods().items():
        if m.fn is not None and m.base == "required":
            assert m.reference is not None, f"{name} has no reference implementation"
