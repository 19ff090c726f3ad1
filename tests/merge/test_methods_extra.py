"""The methods of methods_extra against mergekit 0.1.5's own kernels, tensor by tensor.

Deterministic methods must equal mergekit bit for bit in float32; DELLA (random) must have the same
distribution: keep rates per magnitude rank, the sign-election survivors and the mean result.
"""
from __future__ import annotations

import json

import pytest
import torch

from perturbed import perturbed_family
from weightsmith.errors import WeightsmithError
from weightsmith.merge.methods import consensus, dare, spherical, swap

mk_api = pytest.importorskip("mergekit.merge_methods.api")

SHAPES = [(24, 40), (40,), (3, 5, 8)]


def mergekit(tensors, method, base=None, **parameters):
    """mergekit's result for one tensor; the base (when given) is appended last, as mergekit's
    planner adds a base model that is not among the models."""
    inputs = list(tensors) + ([base] if base is not None else [])
    return mk_api.merge_tensors(inputs, method, parameters=parameters,
                                base_index=len(tensors) if base is not None else None)


def family(shape, n=3, seed=0, sparse=0.0):
    """A base and ``n`` fine-tunes of it; with ``sparse`` a fraction of each delta is exactly zero."""
    g = torch.Generator().manual_seed(seed)
    base = torch.randn(shape, generator=g)
    models = []
    for _ in range(n):
        delta = 0.05 * torch.randn(shape, generator=g)
        if sparse:
            delta *= torch.rand(shape, generator=g) >= sparse
        models.append(base + delta)
    return models, base


def same(a, b):
    assert a.shape == b.shape and a.dtype == b.dtype
    assert torch.equal(a, b), f"max |diff| {(a - b).abs().max().item():.3g}"


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("topk", [1.0, 0.5, 0.1, 0.0])
def test_sce_equals_mergekit(shape, topk):
    models, base = family(shape, seed=1)
    same(consensus.sce(models, base, select_topk=topk), mergekit(models, "sce", base, select_topk=topk))


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("row_wise,flatten", [(False, True), (False, False), (True, False), (True, True)])
@pytest.mark.parametrize("with_base", [False, True])
def test_nuslerp_equals_mergekit(shape, row_wise, flatten, with_base):
    models, base = family(shape, n=2, seed=2)
    base = base if with_base else None
    for w in ([0.6, 0.4], [-0.5, 0.5], [1.0, 3.0]):
        ours = spherical.nuslerp(models, base, w, nuslerp_row_wise=row_wise, nuslerp_flatten=flatten)
        ref = mergekit(models, "nuslerp", base, weight=w, nuslerp_row_wise=row_wise, nuslerp_flatten=flatten)
        same(ours, ref)


def test_nuslerp_colinear_inputs_interpolate_linearly():
    a = torch.arange(1.0, 9.0)
    out = spherical.nuslerp([a, 2 * a], None, [1.0, 1.0])
    torch.testing.assert_close(out, 1.5 * a)


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("with_base", [False, True])
@pytest.mark.parametrize("normalize", [True, False])
def test_multislerp_equals_mergekit(shape, with_base, normalize):
    models, base = family(shape, n=3, seed=3)
    base = base if with_base else None
    w = [0.6, 0.4, 1.0]
    same(spherical.multislerp(models, base, w, normalize_weights=normalize),
         mergekit(models, "multislerp", base, weight=w, normalize_weights=normalize))


def test_multislerp_antipodal_pair_falls_back_to_linear_and_three_refuse():
    a = torch.randn(10)
    torch.testing.assert_close(spherical.multislerp([a, -a], None, [0.5, 0.5]), torch.zeros(10))
    with pytest.raises(WeightsmithError, match="multislerp"):
        spherical.multislerp([a, -a, a.clone() * 0], None, [0.5, 0.5, 0.0])


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("with_base", [False, True])
def test_karcher_equals_mergekit(shape, with_base):
    models, base = family(shape, n=2, seed=4)
    for max_iter, tol in ((10, 1e-5), (5, 1e-5), (1, 1e-3)):
        ours = spherical.karcher(models, base if with_base else None, max_iter=max_iter, tol=tol)
        # karcher ignores the base's role: mergekit gets it as one more input
        ref = mk_api.merge_tensors(models + ([base] if with_base else []), "karcher",
                                   parameters={"max_iter": max_iter, "tol": tol})
        same(ours, ref)


def test_karcher_of_one_direction_keeps_it_with_the_mean_norm():
    a = torch.randn(30)
    out = spherical.karcher([a, 3 * a], None)
    torch.testing.assert_close(out, 2 * a)


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("t", [0.0001, 0.01, 0.5])
def test_nearswap_equals_mergekit(shape, t):
    (other,), base = family(shape, n=1, seed=5)
    same(swap.nearswap([other], base, t), mergekit([other], "nearswap", base, t=t))


@pytest.mark.parametrize("shape", SHAPES)
def test_arcee_fusion_equals_mergekit(shape):
    (other,), base = family(shape, n=1, seed=6)
    out = swap.arcee_fusion([other], base)
    same(out, mergekit([other], "arcee_fusion", base))
    # the fence keeps some of the other model's entries and leaves the rest at the base
    moved = out != base
    assert 0 < moved.sum() < base.numel()


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("epsilon", [1e-5, 0.03])
def test_ram_equals_mergekit(shape, epsilon):
    models, base = family(shape, n=3, seed=7, sparse=0.5)
    same(consensus.ram(models, base, epsilon=epsilon), mergekit(models, "ram", base, epsilon=epsilon))


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("r,alpha", [(0.1, 0.2), (0.05, 1.0), (0.5, 0.0)])
def test_ramplus_tl_equals_mergekit(shape, r, alpha):
    models, base = family(shape, n=3, seed=8, sparse=0.6)
    same(consensus.ramplus_tl(models, base, r=r, alpha=alpha),
         mergekit(models, "ramplus_tl", base, r=r, alpha=alpha))


def test_ram_keeps_unique_deltas_whole_and_averages_shared_ones():
    base = torch.zeros(4)
    a = torch.tensor([1.0, 2.0, 0.0, 0.0])
    b = torch.tensor([3.0, 0.0, 5.0, 0.0])
    torch.testing.assert_close(consensus.ram([a, b], base), torch.tensor([2.0, 2.0, 5.0, 0.0]))


# -- DELLA: same distribution as mergekit's -----------------------------------------------------

@pytest.mark.parametrize("shape", [(1, 4000), (4000,)])
def test_della_keep_rate_rises_with_magnitude_rank_as_mergekit(shape):
    """Per magnitude-rank decile, the fraction kept by our drop and by mergekit's sparsifier agree
    within 4 binomial sigmas, and both follow density − ε → density + ε."""
    from mergekit.sparsify import della_magprune

    density, eps, trials = 0.5, 0.2, 40
    delta = torch.randn(shape)
    order = delta.abs().reshape(-1).argsort()
    ours = torch.zeros(delta.numel())
    theirs = torch.zeros(delta.numel())
    for s in range(trials):
        g = torch.Generator().manual_seed(s)
        ours += (dare.della_drop(delta, density, eps, "none", g) != 0).reshape(-1).float()
        torch.manual_seed(1000 + s)
        theirs += (della_magprune(delta, density, eps, None) != 0).reshape(-1).float()
    n = delta.numel()
    for decile in range(10):
        idx = order[decile * n // 10:(decile + 1) * n // 10]
        expect = density - eps + 2 * eps * (decile + 0.5) / 10
        cells = len(idx) * trials
        sigma = (expect * (1 - expect) / cells) ** 0.5
        a, b = ours[idx].sum() / cells, theirs[idx].sum() / cells
        assert abs(a - b) < 4 * 2**0.5 * sigma
        assert abs(a - expect) < 4 * sigma + 2 * eps / 10


def test_della_l1_rescale_matches_the_input_norm():
    delta = torch.randn(50, 60)
    kept = dare.della_drop(delta, 0.3, 0.1, "l1", torch.Generator().manual_seed(0))
    torch.testing.assert_close(kept.abs().sum(), delta.abs().sum())
    assert (kept == 0).float().mean() > 0.5


@pytest.mark.parametrize("method", ["della", "della_linear"])
def test_della_merge_mean_matches_mergekit(method):
    """Averaged over seeds, the merged tensor of ours and of mergekit agree (the sampling noise of
    the mean shrinks as 1/sqrt(seeds); the bound is 5 of its standard errors)."""
    models, base = family((32, 48), n=3, seed=9)
    w = [1.0, 0.7, 0.4]
    params = {"density": 0.5, "epsilon": 0.15, "lambda": 0.8}
    fn = getattr(dare, method)
    ours, theirs = [], []
    for s in range(60):
        gens = [torch.Generator().manual_seed(10 * s + i) for i in range(3)]
        ours.append(fn(models, base, w, [0.5] * 3, [0.15] * 3, lambda_=0.8, generators=gens))
        torch.manual_seed(5000 + s)
        theirs.append(mergekit(models, method, base, weight=w, **params))
    ours, theirs = torch.stack(ours), torch.stack(theirs)
    se = ((ours.var(0) + theirs.var(0)) / len(ours)).sqrt().clamp(min=1e-6)
    z = (ours.mean(0) - theirs.mean(0)) / se
    assert z.abs().mean() < 1.0  # ~0.8 for two samples of one distribution
    assert (z.abs() > 5).float().mean() < 0.001
    # and the spread is the same too
    ratio = ours.std(0).mean() / theirs.std(0).mean()
    assert 0.9 < ratio < 1.1


def test_della_at_density_one_is_ties_without_trim():
    models, base = family((10, 12), n=3, seed=10)
    out = dare.della(models, base, [1.0] * 3, [1.0] * 3, [0.1] * 3)
    same(out, mergekit(models, "della", base, weight=[1.0] * 3, density=1.0, epsilon=0.1))


def test_della_refuses_epsilon_reaching_past_zero_or_one():
    dare.della_check([0.66], [0.05], "recipe")
    with pytest.raises(WeightsmithError, match="density ± epsilon"):
        dare.della_check([0.66], [1.35], "recipe")
    with pytest.raises(WeightsmithError, match="epsilon"):
        dare.della_check([0.1], [0.1], "recipe")


# -- half precision: the arithmetic in the dtype, as mergekit does it -----------------------------

HALF_CASES = {
    "sce": (lambda ms, b: consensus.sce(ms, b, select_topk=0.5), {"select_topk": 0.5}, True),
    "nuslerp": (lambda ms, b: spherical.nuslerp(ms[:2], b, [0.6, 0.4], nuslerp_flatten=False),
                {"weight": [0.6, 0.4], "nuslerp_flatten": False}, True),
    "multislerp": (lambda ms, b: spherical.multislerp(ms, b, [0.6, 0.4, 1.0]), {"weight": [0.6, 0.4, 1.0]}, True),
    "karcher": (lambda ms, b: spherical.karcher(ms, None, max_iter=5), {"max_iter": 5}, False),
    "nearswap": (lambda ms, b: swap.nearswap(ms[:1], b, 0.01), {"t": 0.01}, True),
    "arcee_fusion": (lambda ms, b: swap.arcee_fusion(ms[:1], b), {}, True),
    "ram": (lambda ms, b: consensus.ram(ms, b), {}, True),
    "ramplus_tl": (lambda ms, b: consensus.ramplus_tl(ms, b, r=0.05, alpha=1.0), {"r": 0.05, "alpha": 1.0}, True),
}


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("name", list(HALF_CASES))
def test_half_precision_equals_mergekit(name, dtype):
    """With half-precision inputs each function is its own mergekit reference: the same result, bit for
    bit, as mergekit's kernel given the same tensors (the engine feeds the recipe's dtype under compat)."""
    fn, params, with_base = HALF_CASES[name]
    models, base = family((24, 40), n=3, seed=11, sparse=0.3)
    models, base = [m.to(dtype) for m in models], base.to(dtype)
    inputs = models[:2] if name == "nuslerp" else models[:1] if name in ("nearswap", "arcee_fusion") else models
    ours = fn(inputs, base)
    theirs = mergekit(inputs, name, base if with_base else None, **params)
    assert torch.equal(ours.to(theirs.dtype), theirs)


def test_engine_refuses_della_epsilon_before_writing(tiny_llama, tmp_path):
    import yaml

    from weightsmith.merge import merge, parse_recipe

    base, a, b = tiny_llama("base", 0), tiny_llama("a", 1), tiny_llama("b", 2)
    recipe = {"merge_method": "della", "base_model": str(base), "parameters": {"density": 0.66, "epsilon": 0.5},
              "models": [{"model": str(a)}, {"model": str(b)}]}
    with pytest.raises(WeightsmithError, match="density ± epsilon"):
        merge(parse_recipe(yaml.safe_dump(recipe)), tmp_path / "out", device="cpu")
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("method,params,extra", [
    ("sce", {"select_topk": 0.5}, {}), ("ram", {}, {}), ("ramplus_tl", {"r": 0.05}, {}),
    ("karcher", {"max_iter": 5}, {}), ("nearswap", {"t": 0.01}, {"one": True}),
    ("arcee_fusion", {}, {"one": True}), ("multislerp", {}, {"weight": True}), ("nuslerp", {}, {"weight": True}),
])
def test_engine_output_equals_the_function_on_each_tensor(method, params, extra, tiny_llama, tmp_path):
    """The engine feeds each method the inputs' tensors for one name: the file equals the function."""
    import yaml

    from weightsmith.checkpoint import Checkpoint
    from weightsmith.merge import all_methods, merge, parse_recipe

    base = tiny_llama("base", 0)
    models = [tiny_llama(f"m{i}", i + 1) for i in range(1 if extra.get("one") else 2)]
    entries = [{"model": str(m), **({"parameters": {"weight": w}} if extra.get("weight") else {})}
               for m, w in zip(models, (0.7, 0.3))]
    recipe = {"merge_method": method, "base_model": str(base), "parameters": params, "models": entries}
    merge(parse_recipe(yaml.safe_dump(recipe)), tmp_path / "out", device="cpu")
    out, b, ms = Checkpoint(tmp_path / "out"), Checkpoint(base), [Checkpoint(m) for m in models]
    fn = all_methods()[method].fn
    kw = dict(params)
    if extra.get("weight"):
        kw["weight"] = [0.7, 0.3]
    for name in out.names():
        expect = fn([m.get(name) for m in ms], b.get(name), **kw)
        assert torch.equal(out.get(name), expect.to(out.get(name).dtype)), name


# -- whole merges through the engine against mergekit 0.1.5, in float32, bfloat16 and float16 ------

DTYPES = ("float32", "bfloat16", "float16")
# mergekit's mask arithmetic promotes these to float32, and it writes that despite a half-precision dtype
FLOAT32_OUT = {"arcee_fusion", "ramplus_tl"}


def engine_recipes(root) -> dict[str, dict]:
    base, ft = str(root / "base"), [str(root / f"ft{i}") for i in range(3)]
    w = lambda *ws: [{"model": m, "parameters": {"weight": x}} for m, x in zip(ft, ws)]  # noqa: E731
    return {
        "sce": {"merge_method": "sce", "base_model": base, "parameters": {"select_topk": 0.3},
                "models": [{"model": m} for m in ft]},
        "nuslerp": {"merge_method": "nuslerp", "base_model": base, "parameters": {"nuslerp_flatten": False},
                    "models": w(0.6, 0.4)},
        "nuslerp_no_base": {"merge_method": "nuslerp", "parameters": {"nuslerp_row_wise": True, "nuslerp_flatten": False},
                            "models": w(0.3, 0.7)},
        "multislerp": {"merge_method": "multislerp", "base_model": base, "models": w(0.5, 0.2, 0.3)},
        "karcher": {"merge_method": "karcher", "base_model": base, "parameters": {"max_iter": 5},
                    "models": [{"model": m} for m in ft[:2]]},
        "nearswap": {"merge_method": "nearswap", "base_model": base, "parameters": {"t": 0.005},
                     "models": [{"model": ft[1]}]},
        "arcee_fusion": {"merge_method": "arcee_fusion", "base_model": base, "models": [{"model": base}, {"model": ft[2]}]},
        "ram": {"merge_method": "ram", "base_model": base, "parameters": {"epsilon": 0.01},
                "models": [{"model": m} for m in ft]},
        "ramplus_tl": {"merge_method": "ramplus_tl", "base_model": base, "parameters": {"epsilon": 0.01, "r": 0.2},
                       "models": [{"model": m} for m in ft]},
        "passthrough": {"merge_method": "passthrough",
                        "models": [{"model": ft[0], "parameters": {"scale": [{"filter": "mlp", "value": 0.5}, {"value": 1}]}}]},
    }


DELLA = {n: {"merge_method": n, "parameters": {"density": 0.4, "epsilon": 0.2, "weight": 1.0}} for n in ("della", "della_linear")}


@pytest.fixture(scope="module")
def dtype_family(tmp_path_factory):
    """A tiny random Llama base and three perturbed fine-tunes, float32 on disk; some deltas exactly zero."""
    return perturbed_family(tmp_path_factory.mktemp("extra-dtypes"), zero_fraction=0.3)


@pytest.fixture(scope="module")
def mergekit_family_outputs(dtype_family):
    import os
    import subprocess
    import sys

    from weightsmith.checkpoint import Checkpoint

    # one thread, as the tests run: torch's float32 dot products (Karcher) change their last bit with the
    # number of threads that split the sum
    runner = ("import json, sys, torch\ntorch.set_num_threads(1)\nfrom mergekit.config import MergeConfiguration\n"
              "from mergekit.merge import MergeOptions, run_merge\n"
              "for cfg, out in json.loads(sys.argv[1]).values():\n"
              "    run_merge(MergeConfiguration.model_validate(cfg), out, MergeOptions(copy_tokenizer=False, "
              "write_model_card=False, quiet=True))\n")
    jobs = {}
    for dt in DTYPES:
        for name, cfg in engine_recipes(dtype_family).items():
            jobs[f"{name}-{dt}"] = ({**cfg, "dtype": dt}, str(dtype_family / f"mk-{name}-{dt}"))
        for name, cfg in DELLA.items():
            cfg = {**cfg, "base_model": str(dtype_family / "base"), "models": [{"model": str(dtype_family / "ft2")}]}
            jobs[f"{name}-{dt}"] = ({**cfg, "dtype": dt}, str(dtype_family / f"mk-{name}-{dt}"))
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "HTTPS_PROXY": "http://127.0.0.1:9"}
    proc = subprocess.run([sys.executable, "-c", runner, json.dumps(jobs)], env=env, capture_output=True, text=True,
                          timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return {name: Checkpoint(out) for name, (_, out) in jobs.items()}


def _ours(cfg: dict, out):
    import yaml

    from weightsmith.checkpoint import Checkpoint
    from weightsmith.merge import merge, parse_recipe

    cfg = {**cfg, "parameters": {**cfg.get("parameters", {}), "compat": "mergekit"}}
    merge(parse_recipe(yaml.safe_dump(cfg)), out, device="cpu")
    return Checkpoint(out)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("name", list(engine_recipes(__import__("pathlib").Path("x"))))
def test_engine_compat_mergekit_is_bit_equal_in_the_recipes_dtype(name, dtype, dtype_family, mergekit_family_outputs,
                                                                  tmp_path):
    ours = _ours({**engine_recipes(dtype_family)[name], "dtype": dtype}, tmp_path / "ws")
    theirs = mergekit_family_outputs[f"{name}-{dtype}"]
    assert sorted(ours.names()) == sorted(theirs.names())
    want = getattr(torch, dtype)
    for n in ours.names():
        a, b = ours.get(n), theirs.get(n)
        assert a.dtype == want
        if name.split("_no_base")[0] in FLOAT32_OUT:
            b = b.to(want)  # mergekit's float32 result, rounded as weightsmith writes it
        assert b.dtype == want and torch.equal(a, b), f"{name} {dtype} {n}: {int((a != b).sum())} of {a.numel()} differ"


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("name", list(DELLA))
def test_engine_della_matches_mergekit_in_distribution(name, dtype, dtype_family, mergekit_family_outputs, tmp_path):
    """One fine-tune, weight 1: base + mask·δ·(L1 rescale). Over the large tensors both keep the same
    fraction of the changed entries (within 0.02) and the rescale keeps each delta's L1 norm (within 5 %)."""
    from weightsmith.checkpoint import Checkpoint

    cfg = {**DELLA[name], "dtype": dtype, "base_model": str(dtype_family / "base"),
           "models": [{"model": str(dtype_family / "ft2")}]}
    ours, theirs = _ours(cfg, tmp_path / "ws"), mergekit_family_outputs[f"{name}-{dtype}"]
    base, ft = Checkpoint(dtype_family / "base"), Checkpoint(dtype_family / "ft2")
    dt = getattr(torch, dtype)
    big = [n for n in base.names() if torch.Size(base.info(n).shape).numel() >= 4096]
    fractions = []
    for out in (ours, theirs):
        kept = changed = 0
        for n in big:
            b = base.get(n).to(dt)
            d = ft.get(n).to(dt) - b
            moved = out.get(n) != b
            kept += int(moved.sum())
            changed += int((d != 0).sum())
            ratio = float((out.get(n) - b).float().abs().sum() / d.float().abs().sum())
            assert abs(ratio - 1) < 0.05, f"{n}: the L1 rescale keeps the delta's norm, got ratio {ratio:.3f}"
        fractions.append(kept / changed)
    # the exact zeros of δ take the lowest ranks, so the changed entries keep a little more than density
    assert abs(fractions[0] - fractions[1]) < 0.02 and 0.4 < min(fractions) and max(fractions) < 0.6, fractions
