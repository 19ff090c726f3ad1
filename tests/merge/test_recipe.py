"""Recipes: unknown keys refused at every level with the closest known key, compat: mergekit accepted by
every method, the per-model keys mergekit ignores, dtype vs out_dtype, shard sizes."""
from __future__ import annotations

import re

import pytest
import torch
import yaml

from weightsmith.checkpoint import Checkpoint
from weightsmith.errors import WeightsmithError
from weightsmith.merge import all_methods, merge, parse_recipe, plan_merge
from weightsmith.checkpoint import parse_size


@pytest.mark.parametrize("text, message", [
    ("merge_method: linear\nmodels:\n  - model: a\n    paramters: {weight: 0.9}\n",
     "models[0]: unknown key 'paramters' (did you mean 'parameters'?)"),
    ("merge_method: linear\nmodels:\n  - modle: a\n", "models[0]: unknown key 'modle' (did you mean 'model'?)"),
    ("merge_metod: linear\nmodels:\n  - model: a\n", "unknown key 'merge_metod' (did you mean 'merge_method'?)"),
    ("merge_method: linear\nmodels:\n  - model: {model: a, lroa: b}\n", "unknown key 'lroa' (did you mean 'lora'?)"),
    ("merge_method: linear\nmodels:\n  - model: a\ndtype: [1]\n", "'dtype' must be a name such as float32, bfloat16 or float16, not [1]"),
    ("merge_method: linera\nmodels:\n  - model: a\n", "did you mean 'linear'?"),
])
def test_unknown_keys_are_refused_at_every_level(text, message):
    with pytest.raises(WeightsmithError, match=re.escape(message)):
        r = parse_recipe(text)
        plan_merge(r)


def test_unknown_parameter_names_the_closest_one(tiny_llama):
    a, b = tiny_llama("a"), tiny_llama("b", seed=1)
    r = parse_recipe(f"merge_method: ties\nbase_model: {a}\nmodels:\n  - model: {b}\n    parameters: {{densty: 0.3}}\n")
    with pytest.raises(WeightsmithError, match=r"no parameter 'densty' \(did you mean 'density'\?\)"):
        plan_merge(r)
    r = parse_recipe(f"merge_method: ties\nbase_model: {a}\nmodels:\n  - model: {b}\n    parameters: {{lambda: 0.3}}\n")
    with pytest.raises(WeightsmithError, match="'lambda' is a global parameter"):
        plan_merge(r)


def _recipe(name: str, a, models) -> dict:
    m = all_methods()[name]
    cfg = {"merge_method": name, "models": [{"model": str(x)} for x in models], "parameters": {"compat": "mergekit"}}
    if m.base == "required":
        cfg["base_model"] = str(a)
    if name == "mwa":
        cfg["models"] = [{"model": str(x), "parameters": {"metric_value": 1.0 + i}} for i, x in enumerate(models)]
    cfg["parameters"].update({p.name: 0.01 for p in m.params if p.required})  # nearswap's t
    return cfg


@pytest.mark.parametrize("name", [n for n, m in all_methods().items() if not m.whole_model])
def test_compat_mergekit_is_accepted_by_every_method(name, tiny_llama):
    a = tiny_llama("a")
    models = [tiny_llama("b", seed=1)] + ([tiny_llama("c", seed=2)] if all_methods()[name].max_models != 1 else [])
    plan = plan_merge(parse_recipe(yaml.safe_dump(_recipe(name, a, models))))
    assert plan.compat == "mergekit" or name == "mwa"


@pytest.mark.parametrize("name", ["slerp", "model_stock"])
def test_per_model_weight_mergekit_ignores_is_noted_under_compat_and_refused_by_default(name, tiny_llama, tmp_path):
    a, b, c = tiny_llama("a"), tiny_llama("b", seed=1), tiny_llama("c", seed=2)
    models = [b] if name == "slerp" else [b, c]
    cfg = {"merge_method": name, "base_model": str(a),
           "models": [{"model": str(x), "parameters": {"weight": 0.3}} for x in models]}
    with pytest.raises(WeightsmithError, match="mergekit accepts and ignores it: compat mergekit does the same"):
        plan_merge(parse_recipe(yaml.safe_dump(cfg)))
    cfg["parameters"] = {"compat": "mergekit"}
    res = merge(parse_recipe(yaml.safe_dump(cfg)), tmp_path / "out")
    assert [n for n in res["notes"] if "weight ignored" in n] == [f"per-model weight ignored by {name} (as mergekit does)"]
    # the weight changed nothing: same output as without it
    del cfg["models"][0]["parameters"]
    for m in cfg["models"]:
        m.pop("parameters", None)
    merge(parse_recipe(yaml.safe_dump(cfg)), tmp_path / "plain")
    one, two = Checkpoint(tmp_path / "out"), Checkpoint(tmp_path / "plain")
    assert all(torch.equal(one.get(n), two.get(n)) for n in one.names())


def test_dtype_is_the_arithmetic_only_under_compat(tiny_llama, tmp_path):
    a, b = tiny_llama("a"), tiny_llama("b", seed=1)
    cfg = {"merge_method": "task_arithmetic", "base_model": str(a), "models": [{"model": str(b)}],
           "dtype": "bfloat16", "out_dtype": "float32", "parameters": {"lambda": 0.37}}
    default = plan_merge(parse_recipe(yaml.safe_dump(cfg)))
    assert {j.compute for j in default.jobs} == {torch.float32} and {j.dtype for j in default.jobs} == {torch.float32}
    cfg["parameters"]["compat"] = "mergekit"
    compat = plan_merge(parse_recipe(yaml.safe_dump(cfg)))
    assert {j.compute for j in compat.jobs} == {torch.bfloat16} and {j.dtype for j in compat.jobs} == {torch.float32}
    assert any("arithmetic in bfloat16, written as float32" in n for n in compat.notes)


@pytest.mark.parametrize("size, want", [
    ("1B", 10**9), ("50K", 50_000), ("500M", 5 * 10**8), ("75000000", 75 * 10**6), ("2GB", 2 * 10**9),
    ("300MiB", 300 * 2**20), ("1.5K", 1500), (4096, 4096), ("5B", 5 * 10**9),
])
def test_shard_sizes_count_bytes_as_mergekit_writes_them(size, want):
    assert parse_size(size) == want  # mergekit's K/M/B suffixes, byte units, a bare count: all bytes


@pytest.mark.parametrize("size", ["1", "100", "10KiBs", "1 parsec", "-5B", 10])
def test_absurd_or_unreadable_shard_sizes_are_refused(size):
    with pytest.raises(WeightsmithError, match="^out_shard_size: "):
        parse_size(size)


def test_every_stage_reads_one_size_grammar():
    from weightsmith.stage_options import AlignOptions, ExportOptions, FoldOptions, MergeOptions, PleasOptions

    for opts in (MergeOptions(out_shard_size="5B"), FoldOptions(data="d", out_shard_size="5B"),
                 PleasOptions(data="d", out_shard_size="5B"), AlignOptions(out_shard_size="5B"),
                 ExportOptions(out_shard_size="5B")):
        assert opts.out_shard_size == 5 * 10**9  # the library sees bytes, whatever stage took the text


def test_one_billion_parameters_is_one_shard_not_one_tensor_per_file(tiny_llama, tmp_path):
    a, b = tiny_llama("a"), tiny_llama("b", seed=1)
    merge(parse_recipe(f"merge_method: linear\nmodels:\n  - model: {a}\n  - model: {b}\n"), tmp_path / "o",
          out_shard_size="1B")
    assert len(Checkpoint(tmp_path / "o").files) == 1
