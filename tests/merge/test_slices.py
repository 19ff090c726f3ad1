"""Layer stacking (``slices:``): passthrough copies source layers bit for bit under their new indices,
per-slice merges equal mergekit 0.1.5's output in float32, and the stacked model loads in transformers."""
from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch
import yaml

from weightsmith.checkpoint import Checkpoint
from weightsmith.errors import WeightsmithError
from weightsmith.merge import merge, parse_recipe

RUNNER = """
import json, sys
from mergekit.config import MergeConfiguration
from mergekit.merge import MergeOptions, run_merge
for cfg, out in json.loads(sys.argv[1]):
    run_merge(MergeConfiguration.model_validate(cfg), out,
              MergeOptions(copy_tokenizer=False, write_model_card=False, quiet=True))
"""


def run_mergekit(jobs):
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "HTTPS_PROXY": "http://127.0.0.1:9",
           "HTTP_PROXY": "http://127.0.0.1:9"}
    proc = subprocess.run([sys.executable, "-c", RUNNER, json.dumps(jobs)], env=env, capture_output=True, text=True,
                          timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]


@pytest.fixture(scope="module")
def four_layer(tmp_path_factory):
    """Three random 4-layer Llamas of one shape (float32)."""
    from weightsmith.zoo.synthetic import random_llama

    root = tmp_path_factory.mktemp("stack")
    return {n: str(random_llama(root / n, seed=i, num_hidden_layers=4, vocab_size=64)) for i, n in enumerate("abc")}


def stacked(recipe: dict, out, **kw):
    merge(parse_recipe(yaml.safe_dump(recipe)), out, device="cpu", **kw)
    return Checkpoint(out)


def test_passthrough_stack_copies_source_layers_bit_for_bit(four_layer, tmp_path):
    a, b = four_layer["a"], four_layer["b"]
    out = stacked({"merge_method": "passthrough", "slices": [
        {"sources": [{"model": a, "layer_range": [0, 3]}]},
        {"sources": [{"model": b, "layer_range": [1, 4]}]}]}, tmp_path / "out")
    src_a, src_b = Checkpoint(a), Checkpoint(b)
    assert out.config["num_hidden_layers"] == 6
    for name in out.names():
        if ".layers." not in name:
            owner = src_b if name.startswith("lm_head") or name == "model.norm.weight" else src_a
            assert torch.equal(out.get(name), owner.get(name)), name
            continue
        i = int(name.split(".layers.")[1].split(".")[0])
        key = name.split(f".layers.{i}.")[1]
        src, j = (src_a, i) if i < 3 else (src_b, i - 3 + 1)
        assert torch.equal(out.get(name), src.get(f"model.layers.{j}.{key}")), name
    assert len([n for n in out.names() if n.endswith("self_attn.q_proj.weight")]) == 6


def test_stacked_model_loads_and_runs_in_transformers(four_layer, tmp_path):
    from transformers import AutoModelForCausalLM

    a = four_layer["a"]
    stacked({"merge_method": "passthrough", "slices": [{"sources": [{"model": a, "layer_range": [0, 4]}]}] * 2},
            tmp_path / "out")
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "out")
    assert model.config.num_hidden_layers == 8 and len(model.model.layers) == 8
    logits = model(torch.tensor([[1, 2, 3]])).logits
    assert logits.shape == (1, 3, 64) and torch.isfinite(logits).all()


def test_passthrough_scale_filter_zeroes_the_filtered_tensors(four_layer, tmp_path):
    a = four_layer["a"]
    out = stacked({"merge_method": "passthrough", "models": [
        {"model": a, "parameters": {"scale": [{"filter": "o_proj", "value": 0}, {"value": 1}]}}]}, tmp_path / "out")
    src = Checkpoint(a)
    for name in out.names():
        expect = torch.zeros_like(src.get(name)) if "o_proj" in name else src.get(name)
        assert torch.equal(out.get(name), expect), name


SLICE_RECIPES = {
    "gradient_slerp": lambda z: {
        "merge_method": "slerp", "base_model": z["a"],
        "parameters": {"t": [{"filter": "self_attn", "value": [0, 0.5, 0.3, 0.7, 1]},
                             {"filter": "mlp", "value": [1, 0.5, 0.7, 0.3, 0]}, {"value": 0.5}]},
        "slices": [{"sources": [{"model": z["a"], "layer_range": [0, 4]}, {"model": z["b"], "layer_range": [0, 4]}]}]},
    "per_slice_linear": lambda z: {
        "merge_method": "linear",
        "slices": [
            {"sources": [{"model": z["a"], "layer_range": [0, 2], "parameters": {"weight": 0.3}},
                         {"model": z["b"], "layer_range": [2, 4], "parameters": {"weight": [1.0, 0.2]}}]},
            {"sources": [{"model": z["c"], "layer_range": [1, 4]}, {"model": z["a"], "layer_range": [1, 4]}],
             "parameters": {"weight": 0.5}}]},
    "ties_slices": lambda z: {
        "merge_method": "ties", "base_model": z["a"], "parameters": {"density": 0.4, "weight": 1.0},
        "slices": [{"sources": [{"model": z["a"], "layer_range": [0, 2]}, {"model": z["b"], "layer_range": [0, 2]},
                                {"model": z["c"], "layer_range": [0, 2]}]},
                   {"sources": [{"model": z["a"], "layer_range": [3, 4]}, {"model": z["c"], "layer_range": [3, 4]}],
                    "parameters": {"density": 0.7}}]},
}


@pytest.fixture(scope="module")
def mergekit_slices(four_layer, tmp_path_factory):
    pytest.importorskip("mergekit")
    root = tmp_path_factory.mktemp("mk-slices")
    jobs = [({**make(four_layer), "dtype": "float32"}, str(root / name)) for name, make in SLICE_RECIPES.items()]
    run_mergekit(jobs)
    return {name: str(root / name) for name in SLICE_RECIPES}


@pytest.mark.parametrize("name", list(SLICE_RECIPES))
def test_slices_recipe_equals_mergekit_bit_for_bit(name, four_layer, mergekit_slices, tmp_path):
    recipe = {**SLICE_RECIPES[name](four_layer), "dtype": "float32"}
    if recipe["merge_method"] == "ties":
        recipe["parameters"] = {**recipe["parameters"], "compat": "mergekit"}
    ours, theirs = stacked(recipe, tmp_path / "ws"), Checkpoint(mergekit_slices[name])
    assert sorted(ours.names()) == sorted(theirs.names())
    for n in ours.names():
        assert torch.equal(ours.get(n), theirs.get(n)), n
    assert ours.config["num_hidden_layers"] == theirs.config["num_hidden_layers"]


def test_slices_refuse_unknown_keys_ragged_sources_and_ranges_past_the_model(four_layer, tmp_path):
    a, b = four_layer["a"], four_layer["b"]
    bad = [
        ({"sources": [{"model": a, "layer_rnage": [0, 2]}]}, "did you mean 'layer_range'"),
        ({"sources": [{"model": a, "layer_range": [0, 2]}, {"model": b, "layer_range": [0, 3]}]}, "same number"),
        ({"sources": [{"model": a, "layer_range": [2, 9]}]}, "reaches past"),
        ({"sources": [{"model": a, "layer_range": [0, 2]}], "residual_weight": 0.5}, "residual_weight"),
        ({"sources": [{"model": a, "layer_range": [0, 2], "parameters": {"scael": 1}}]}, "did you mean 'scale'"),
    ]
    for s, msg in bad:
        with pytest.raises(WeightsmithError, match=msg):
            stacked({"merge_method": "passthrough", "slices": [s]}, tmp_path / "never")
        assert not (tmp_path / "never").exists()
    with pytest.raises(WeightsmithError, match="not both"):
        parse_recipe(yaml.safe_dump({"merge_method": "linear", "models": [{"model": a}],
                                     "slices": [{"sources": [{"model": a, "layer_range": [0, 2]}]}]}))


def test_slice_weight_mergekit_ignores_is_refused_by_default_and_noted_under_compat(four_layer, tmp_path):
    a, b = four_layer["a"], four_layer["b"]
    recipe = {"merge_method": "slerp", "base_model": a, "parameters": {"t": 0.3},
              "slices": [{"sources": [{"model": a, "layer_range": [0, 4]},
                                      {"model": b, "layer_range": [0, 4], "parameters": {"weight": 0.5}}]}]}
    with pytest.raises(WeightsmithError, match="compat mergekit"):
        stacked(recipe, tmp_path / "refused")
    recipe["parameters"]["compat"] = "mergekit"
    report = merge(parse_recipe(yaml.safe_dump(recipe)), tmp_path / "ok", device="cpu")
    assert any("weight ignored by slerp" in n for n in report["notes"])


def test_one_module_form_is_the_plain_form_and_multi_module_recipes_are_refused(four_layer, tmp_path):
    a, b = four_layer["a"], four_layer["b"]
    plain = {"merge_method": "linear", "parameters": {"normalize": False},
             "slices": [{"sources": [{"model": a, "layer_range": [0, 4], "parameters": {"weight": 0.3}},
                                     {"model": b, "layer_range": [0, 4], "parameters": {"weight": 0.5}}]}]}
    moduled = {"merge_method": "linear", "parameters": {"normalize": True},
               "modules": {"default": {"slices": plain["slices"], "parameters": {"normalize": False}}}}
    one, two = stacked(plain, tmp_path / "plain"), stacked(moduled, tmp_path / "moduled")
    assert all(torch.equal(one.get(n), two.get(n)) for n in one.names())
    with pytest.raises(WeightsmithError, match="only the one-module form"):
        parse_recipe(yaml.safe_dump({"merge_method": "linear", "modules": {"text_decoder": {"models": [{"model": a}]}}}))
    with pytest.raises(WeightsmithError, match="'slics'"):
        parse_recipe(yaml.safe_dump({"merge_method": "linear", "modules": {"default": {"slics": []}}}))
