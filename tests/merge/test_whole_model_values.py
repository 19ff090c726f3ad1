"""The merge value checks and the tokenizer/model-card flags for the merges that are not one tensor at a time:
greedy_soup (engine merges of its soups), pleas (whole models in memory) and mwa (weights, then a linear
merge): NaN/inf inputs are refused naming the model and the tensor unless --allow-nonfinite, and
--no-copy-tokenizer / --no-write-model-card are honoured instead of refused."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from weightsmith.errors import WeightsmithError
from weightsmith.merge import merge
from weightsmith.merge.recipe import recipe_from_flags

TENSOR = "model.layers.0.mlp.up_proj.weight"


def poison(folder: Path, name: str = TENSOR, value: float = float("nan")) -> None:
    """One entry of ``name`` in ``folder``'s single safetensors file set to ``value``."""
    path = folder / "model.safetensors"
    state = load_file(path)
    state[name] = state[name].clone()
    state[name].view(-1)[3] = value
    save_file(state, path, metadata={"format": "pt"})


@pytest.fixture
def pair(tiny_llama, zoo, tmp_path):
    """Two tiny Llamas (a with the zoo's tokenizer) and a calibration/held-out text."""
    from transformers import AutoTokenizer

    a, b = tiny_llama("a", seed=0, vocab_size=1024), tiny_llama("b", seed=1, vocab_size=1024)
    tok = AutoTokenizer.from_pretrained(str(zoo.model("base")))
    tok.save_pretrained(a)
    tok.save_pretrained(b)
    data = tmp_path / "d.txt"
    data.write_text(" ".join(f"w{i % 37} x{i % 11}" for i in range(300)))
    return a, b, data


def _pleas(a, b, data, **params):
    return recipe_from_flags("pleas", [str(a), str(b)], parameters={"data": str(data), "width": 1.0, "seq_len": 16,
                                                                    "max_tokens": 256, **params})


def _soup(a, b, data):
    return recipe_from_flags("greedy_soup", [str(a), str(b)], parameters={"data": str(data), "max_tokens": 256})


@pytest.mark.parametrize("method", ["pleas", "greedy_soup"])
def test_nonfinite_inputs_are_refused_by_whole_model_merges(method, pair, tmp_path):
    a, b, data = pair
    poison(b)
    recipe = _pleas(a, b, data) if method == "pleas" else _soup(a, b, data)
    with pytest.raises(WeightsmithError, match=rf"{b}: tensor '{TENSOR}' holds 1 NaN/inf.*set allow_nonfinite"):
        merge(recipe, tmp_path / "out", device="cpu")
    assert not (tmp_path / "out").exists()


def test_pleas_refuses_a_result_made_non_finite(pair, tmp_path, monkeypatch):
    """Finite inputs, a non-finite merged tensor (here planted in the merged model): refused by name."""
    from weightsmith.merge import pleas_stage

    a, b, data = pair
    original = pleas_stage.merge_blocks

    def spoiled(pair, plans, how, write, progress=None):
        def spoil(path, module):
            if TENSOR.startswith(path + "."):
                with torch.no_grad():
                    module.get_parameter(TENSOR[len(path) + 1:]).view(-1)[0] = float("inf")
            write(path, module)
        return original(pair, plans, how, spoil, progress)
    monkeypatch.setattr(pleas_stage, "merge_blocks", spoiled)
    with pytest.raises(WeightsmithError, match=f"merged tensor '{TENSOR}' is not finite although its inputs are"):
        merge(_pleas(a, b, data), tmp_path / "out", device="cpu")


def test_mwa_refuses_or_reports_nonfinite_inputs(tiny_llama, tmp_path):
    a, b = tiny_llama("a", seed=0), tiny_llama("b", seed=1)
    poison(a)
    recipe = recipe_from_flags("mwa", [str(a), str(b)], per_model={"metric_value": [0.5, 0.7]},
                               parameters={"metric": "loss"})
    with pytest.raises(WeightsmithError, match=rf"{a}: tensor '{TENSOR}' holds 1 NaN/inf"):
        merge(recipe, tmp_path / "out", device="cpu")
    report = merge(recipe, tmp_path / "out", device="cpu", allow_nonfinite=True)
    assert report["nonfinite"] == [{"model": str(a), "tensor": TENSOR, "nonfinite": 1}]


@pytest.mark.parametrize("method", ["pleas", "greedy_soup"])
def test_whole_model_merges_honour_the_tokenizer_and_card_flags(method, pair, tmp_path):
    a, b, data = pair
    recipe = _pleas(a, b, data) if method == "pleas" else _soup(a, b, data)
    both = merge(recipe, tmp_path / "both", device="cpu")
    neither = merge(recipe, tmp_path / "neither", device="cpu", copy_tokenizer=False, model_card=False)
    assert (tmp_path / "both" / "tokenizer.json").is_file() and (tmp_path / "both" / "README.md").is_file()
    assert not (tmp_path / "neither" / "tokenizer.json").exists()
    assert not (tmp_path / "neither" / "README.md").exists()
    assert json.loads((tmp_path / "neither" / "config.json").read_text())["hidden_size"] == 32
    assert both["method"] == neither["method"] == method
    for name in ("model.safetensors",):
        assert (tmp_path / "neither" / name).is_file() or any((tmp_path / "neither").glob("*.safetensors"))
    shutil.rmtree(tmp_path / "both")
