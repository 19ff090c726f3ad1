"""The native half-precision task-vector merges under compat: mergekit (merge/compat_native.py) against the
reference (merge/reference.py: mergekit's torch arithmetic in the dtype, written plainly), bit for bit, and
the 16-bit tie-order replay against torch.sort itself. mergekit itself is compared in
test_mergekit_equivalence.py (bfloat16 and float16 recipes through the engine, which takes this path)."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from weightsmith.merge.methods import reference
from weightsmith.merge.native import compat_native as cn
from weightsmith.merge.native import mixing
from weightsmith.merge.registry import all_methods

pytestmark = pytest.mark.skipif(mixing.native_kernels() is None, reason="native kernels not built")

HALVES = [torch.bfloat16, torch.float16]


def tied(n: int, seed: int, dtype: torch.dtype, levels: int = 40):
    """A base and three inputs whose deltas take few distinct values: long runs of ties at every cut."""
    g = torch.Generator().manual_seed(seed)
    base = torch.randn(n, generator=g) * 0.02
    models = [base + torch.randint(-levels, levels + 1, (n,), generator=g).float() / (levels * 50) for _ in range(3)]
    return base.to(dtype), [m.to(dtype) for m in models]


def wild(n: int, seed: int, dtype: torch.dtype, count: int = 4):
    """Values over twelve decades (float16 subnormals and overflow included), zeros of both signs, and inputs
    equal to the base in places: every rounding step matters."""
    g = torch.Generator().manual_seed(seed)

    def one() -> torch.Tensor:
        v = torch.randn(n, generator=g) * torch.pow(10.0, torch.randint(-9, 4, (n,), generator=g).float())
        v[torch.rand(n, generator=g) < 0.05] = 0.0
        v[torch.rand(n, generator=g) < 0.02] = -0.0
        return v
    base = one()
    models = [torch.where(torch.rand(n, generator=g) < 0.1, base, one()) for _ in range(count)]
    return base.to(dtype), [m.to(dtype) for m in models]


def same_bits(a: torch.Tensor, b: torch.Tensor) -> int:
    """How many entries differ in their bits (−0.0 vs 0.0 and NaN payloads included)."""
    assert a.dtype == b.dtype and a.shape == b.shape
    return int((a.view(torch.int16) != b.view(torch.int16)).sum())


def fast(name: str, models, base, kw) -> torch.Tensor:
    """The kernels' path alone (asserting it applies), with the method's arguments."""
    cut = {"ties": cn._top(kw.get("density", [])), "task_arithmetic": None,
           "breadcrumbs": cn._outliers(kw.get("density", []), kw.get("gamma", [])),
           "breadcrumbs_ties": cn._outliers(kw.get("density", []), kw.get("gamma", []))}[name]
    consensus = name in ("ties", "breadcrumbs_ties")
    out = cn.task_merge([m.clone() for m in models], base.clone(), kw["weight"], cut, consensus, kw["normalize"],
                        kw["lambda_"])
    assert out is not None, "the native path did not apply"
    return out


CASES = {
    "ties": dict(density=[0.3, 0.55, 0.8], normalize=True, lambda_=0.9),
    "task_arithmetic": dict(normalize=True, lambda_=0.9),
    "breadcrumbs": dict(density=[0.3, 0.55, 0.8], gamma=[0.02, 0.1, 0.0], normalize=False, lambda_=1.0),
    "breadcrumbs_ties": dict(density=[0.3, 0.55, 0.8], gamma=[0.02, 0.1, 0.0], normalize=True, lambda_=1.3),
}


@pytest.mark.parametrize("dtype", HALVES)
@pytest.mark.parametrize("name", sorted(CASES))
@pytest.mark.parametrize("n", [1, 17, 5000, 70_001])
def test_native_half_merge_equals_the_reference(dtype, name, n):
    base, models = tied(n, seed=n % 89, dtype=dtype)
    for weight in ([1.0, 0.6, -0.3], [1.0, 1.0, 1.0]):
        kw = {**CASES[name], "weight": weight}
        want = getattr(reference, name)([m.clone() for m in models], base.clone(), **kw)
        got = fast(name, models, base, kw)
        assert got.dtype == dtype and same_bits(got, want) == 0


@pytest.mark.parametrize("dtype", HALVES)
@pytest.mark.parametrize("seed", range(3))
def test_every_rounding_step_as_torch_does_it(dtype, seed):
    base, models = wild(20_000, seed, dtype)
    for consensus in (True, False):
        for normalize in (True, False):
            for lambda_ in (1.0, 0.37):
                w = [1.0, 0.6, -0.3, 2.7] if seed % 2 else [1e-3, 0.5, 7.0, 0.25]
                d = [0.3, 0.55, 0.8, 0.01]
                want = reference.task_merge([m.clone() for m in models], base.clone(), w,
                                            lambda x, i: reference.magnitude(x, d[i]), consensus, normalize, lambda_)
                got = cn.task_merge([m.clone() for m in models], base.clone(), w, cn._top(d), consensus, normalize,
                                    lambda_)
                assert same_bits(got, want) == 0, (consensus, normalize, lambda_)


@pytest.mark.parametrize("dtype", HALVES)
def test_planted_ties_at_the_cut_keep_mergekits_choice(dtype, monkeypatch):
    """|δ| of one value everywhere except a few larger ones: the cut falls inside one run of 9,000 ties and
    only some are kept; which ones is the sort's choice, so a real sort is the oracle."""
    n = 10_000
    base = torch.zeros(n, dtype=dtype)
    g = torch.Generator().manual_seed(1)
    models = []
    for _ in range(3):
        delta = torch.full((n,), 0.25) * (torch.randint(0, 2, (n,), generator=g) * 2 - 1)
        delta[torch.randperm(n, generator=g)[:1000]] = 0.5
        models.append(delta.to(dtype))
    kw = {"weight": [1.0, 0.6, -0.3], "density": [0.3, 0.45, 0.6], "normalize": True, "lambda_": 1.0}
    got = fast("ties", models, base, kw)
    monkeypatch.setattr(cn, "_replay16_agrees", lambda kernels: False)  # a real sort picks the ties
    sorted_ = fast("ties", models, base, kw)
    want = reference.ties([m.clone() for m in models], base.clone(), **kw)
    assert same_bits(got, want) == 0 and same_bits(sorted_, want) == 0
    # each input kept exactly its top-k: the 1000 larger ones and the first of its ties in sort order
    for i, m in enumerate(models):
        kept = cn.task_merge([m.clone()], base.clone(), [1.0], cn._top([kw["density"][i]]), False, False, 1.0)
        assert int((kept != 0).sum()) == int(kw["density"][i] * n)


def test_large_tensors_follow_only_the_tied_keys(monkeypatch):
    """Above PARALLEL_LIMIT the cuts run side by side with no index array: the same bits."""
    monkeypatch.setattr(reference, "PARALLEL_LIMIT", 1000)
    base, models = tied(30_000, seed=4, dtype=torch.bfloat16)
    kw = {**CASES["ties"], "weight": [1.0, 0.6, -0.3]}
    assert same_bits(fast("ties", models, base, kw), reference.ties([m.clone() for m in models], base.clone(), **kw)) == 0


def test_where_the_kernels_do_not_apply_the_reference_runs():
    base, models = tied(3000, seed=2, dtype=torch.bfloat16)
    kw = {**CASES["ties"], "weight": [1.0, 0.6, -0.3]}
    # an L1 rescale, float32, a non-finite input, 16 inputs: each goes to the reference
    assert cn.task_merge([m.float() for m in models], base.float(), kw["weight"], None, True, True, 1.0) is None
    bad = [m.clone() for m in models]
    bad[1][7] = float("nan")
    assert cn.task_merge(bad, base.clone(), kw["weight"], cn._top(kw["density"]), True, True, 1.0) is None
    many = [models[0].clone() for _ in range(16)]
    assert cn.task_merge(many, base.clone(), [1.0] * 16, None, False, False, 1.0) is None
    method = all_methods()["ties"]
    assert method.reference is cn.ties
    for rescale in ("l1", None):
        want = reference.ties([m.clone() for m in models], base.clone(), rescale=rescale, **kw)
        got = cn.ties([m.clone() for m in models], base.clone(), rescale=rescale, **kw)
        assert same_bits(got, want) == 0


@pytest.mark.parametrize("seed", range(4))
def test_sixteen_bit_replay_equals_torch_sort(seed):
    """The replay on 16-bit keys (halves' bits) against torch.sort of the same values as floats, both
    directions, with every key followed by an index array and with the tied keys alone followed in a list
    (``lean``: up to a quarter of the keys tied), on few and on many ties."""
    kernels = mixing.native_kernels()
    g = torch.Generator().manual_seed(seed)
    for _ in range(12):
        n = int(torch.randint(17, 30_000, (1,), generator=g))
        spread = int(torch.randint(2, 3000, (1,), generator=g))
        x = torch.randint(0, spread, (n,), generator=g).to(torch.bfloat16).float()
        bits = x.to(torch.bfloat16).view(torch.int16).numpy().view(np.uint16)
        picks = sorted({float(x[int(torch.randint(0, n, (1,), generator=g))]) for _ in range(2)})
        codes = [int(bits[(x == v).numpy()][0]) for v in picks]
        for desc in (True, False):
            order = torch.sort(x, descending=desc).indices.numpy()
            want = [order[x.numpy()[order] == v] for v in picks]
            for lean in (False, True):
                got = kernels.sort_ties(bits, desc, codes, lean=lean)
                assert all(np.array_equal(w, t) for w, t in zip(want, got))
            kept = bits.copy()
            got = kernels.sort_ties(kept, desc, codes, owned=True)  # index array; the keys come back
            assert all(np.array_equal(w, t) for w, t in zip(want, got))


@pytest.mark.parametrize("dtype", HALVES)
def test_whole_model_trim_is_applied_not_ignored(dtype):
    """trim: model under compat: mergekit in half precision cuts at the engine's whole-model thresholds
    (|δ| >= t), native and reference alike; a per-tensor trim would keep a different set."""
    base, models = tied(20_000, seed=6, dtype=dtype)
    kw = {"weight": [1.0, 0.6, -0.3], "density": [0.3, 0.3, 0.3], "normalize": True, "lambda_": 1.0}
    threshold = [0.004, -1.0, float("inf")]  # a cut, keep all, keep none
    want = reference.ties([m.clone() for m in models], base.clone(), threshold=threshold, **kw)
    got = cn.ties([m.clone() for m in models], base.clone(), threshold=threshold, **kw)
    assert same_bits(got, want) == 0
    per_tensor = reference.ties([m.clone() for m in models], base.clone(), **kw)
    assert same_bits(got, per_tensor) > 0
    # input 0 alone: exactly the entries with |δ| >= 0.004 survive
    alone = cn.ties([models[0].clone()], base.clone(), weight=[1.0], density=[0.3], normalize=False, threshold=[0.004])
    delta = (models[0].float() - base.float()).to(dtype).float()
    assert torch.equal(alone.float() != base.float(), delta.abs() >= 0.004)


@pytest.mark.parametrize("dtype", HALVES)
@pytest.mark.parametrize("name", ["dare_linear", "dare_ties"])
def test_dare_takes_the_references_draws_and_merges_natively(dtype, name, monkeypatch):
    """DARE's masks are drawn by torch exactly as the reference draws them (same generators, same order), the
    kernels merge the sparsified deltas: bit-equal to the reference, and it did not fall back."""
    base, models = tied(30_000, seed=8, dtype=dtype)
    kw = {"weight": [1.0, 0.6, -0.3], "density": [0.3, 0.55, 0.8], "normalize": True, "lambda_": 0.9, "rescale": "l1"}

    def gens():
        return [torch.Generator().manual_seed(100 + i) for i in range(3)]
    want = getattr(reference, name)([m.clone() for m in models], base.clone(), generators=gens(), **kw)
    plain = []
    monkeypatch.setattr(reference, "task_merge", lambda *a, **k: plain.append(1))
    got = getattr(cn, name)([m.clone() for m in models], base.clone(), generators=gens(), **kw)
    assert not plain and same_bits(got, want) == 0
