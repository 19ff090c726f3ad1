"""A model is exactly its tensors: a folder lacking a tensor its config's model needs, holding one it has no
place for, or whose config is deeper than its tensors is refused by every command that builds a model, before
anything is allocated; tied weights and weightsmith's own formats (shared blocks, hashed memory) still load."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch

from cli_check import refused, snapshot
from hostile import cli, resave, set_config
from weightsmith.checkpoint import Checkpoint


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    from weightsmith.zoo.synthetic import random_bert, random_gpt2, random_llama

    root = tmp_path_factory.mktemp("exact")
    return {"llama": random_llama(root / "llama", num_hidden_layers=3),
            "tied-llama": random_llama(root / "tied", tie_word_embeddings=True),
            "gpt2": random_gpt2(root / "gpt2"), "bert": random_bert(root / "bert")}


def drop(*names):
    def change(state):
        for n in names:
            del state[n]
    return change


def add(name, shape=(4, 4)):
    return lambda state: state.__setitem__(name, torch.zeros(shape))


def only(name):
    def change(state):
        state.clear()
        state[name] = torch.zeros(8, 8)
    return change


# (model, tensor edit, config edit, words of the refusal): none of them may load, whatever the command
VARIANTS = {
    "attention-key-missing": ("llama", drop("model.layers.1.self_attn.k_proj.weight"), {},
                              ["model.layers.1.self_attn.k_proj.weight", "lacks it"]),
    "untied-head-missing": ("llama", drop("lm_head.weight"), {}, ["'lm_head.weight'", "lacks it"]),
    "gpt2-last-block-norm-missing": ("gpt2", drop("transformer.h.1.ln_2.bias"), {}, ["transformer.h.1.ln_2.bias"]),
    "bert-embedding-missing": ("bert", drop("embeddings.token_type_embeddings.weight"), {},
                               ["embeddings.token_type_embeddings.weight"]),
    "extra-adapter-tensor": ("llama", add("model.layers.0.mlp.up_proj.lora_A.weight"), {},
                             ["model.layers.0.mlp.up_proj.lora_A.weight", "not part of the model"]),
    "only-an-unrelated-tensor": ("gpt2", only("base_model.model.score.weight"), {}, ["hold 0", "none for layer 0"]),
    "config-a-layer-short": ("llama", lambda s: None, {"num_hidden_layers": 2},
                             ["model.layers.2.", "not part of the model"]),
    "config-billion-layers": ("llama", lambda s: None, {"num_hidden_layers": 10**9},
                              ["1000000000 layers deep", "hold 3", "none for layer 3"]),
    "gpt2-config-deeper": ("gpt2", lambda s: None, {"n_layer": 7}, ["7 layers deep", "none for layer 2"]),
}


def planted(models, tmp_path, variant) -> tuple[Path, list[str]]:
    kind, tensors, config, words = VARIANTS[variant]
    m = tmp_path / "in" / variant
    shutil.copytree(models[kind], m)
    resave(m, tensors)
    if config:
        set_config(m, **config)
    return m, words


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_load_refuses_a_folder_that_is_not_exactly_its_model(variant, models, tmp_path):
    from weightsmith import load
    from weightsmith.errors import WeightsmithError

    m, words = planted(models, tmp_path, variant)
    with pytest.raises(WeightsmithError) as err:
        load(m)
    assert str(m) in str(err.value) and all(w in str(err.value) for w in words), err.value


COMMANDS = {
    "eval": lambda m, d, out: ["eval", m, "--data", d, "--device", "cpu", "--quiet"],
    "fold": lambda m, d, out: ["fold", m, "-o", out, "--data", d, "--device", "cpu", "--quiet"],
    "compress": lambda m, d, out: ["compress", "rps", m, "-o", out, "--budget", "0.5", "--device", "cpu", "--quiet"],
}


@pytest.mark.parametrize("command", list(COMMANDS))
@pytest.mark.parametrize("variant", ["attention-key-missing", "extra-adapter-tensor", "config-billion-layers"])
def test_no_command_scores_or_writes_invented_weights(command, variant, models, tmp_path, capsys, monkeypatch):
    m, words = planted(models, tmp_path, variant)
    data = tmp_path / "text.txt"
    data.write_text("a few words of calibration text " * 40)
    before = snapshot(tmp_path)
    proc = cli(capsys, monkeypatch, *COMMANDS[command](m, data, tmp_path / "out"))
    refused(proc, str(m), *words)
    assert snapshot(tmp_path) == before


def test_run_refuses_it_before_its_first_stage(models, tmp_path, capsys, monkeypatch):
    m, words = planted(models, tmp_path, "untied-head-missing")
    data = tmp_path / "text.txt"
    data.write_text("a few words of calibration text " * 40)
    spec = tmp_path / "pipe.yaml"
    spec.write_text(json.dumps({"workdir": str(tmp_path / "work"), "stages": [
        {"name": "small", "stage": "compress", "inputs": [str(m)], "params": {"budget": 0.5}}]}))
    proc = cli(capsys, monkeypatch, "run", spec, "--device", "cpu", "--quiet")
    refused(proc, *words)
    assert not (tmp_path / "work" / "small").exists()


def test_tied_weights_load_tied_and_every_stored_tensor_is_used(models):
    """Tied heads are not stored and are not missing: the loaded head is the embedding itself."""
    from weightsmith import load

    for kind, head, embed in (("tied-llama", "lm_head", "model.embed_tokens"), ("gpt2", "lm_head", "transformer.wte")):
        assert f"{head}.weight" not in Checkpoint(models[kind]).names()
        model = load(models[kind])
        assert model.get_submodule(head).weight is model.get_submodule(embed).weight
        stored = Checkpoint(models[kind]).state_dict()
        loaded = model.state_dict()
        assert all(torch.equal(loaded[k], v) for k, v in stored.items())


def test_weightsmith_formats_refuse_a_missing_tensor_of_their_own_layout(models, tmp_path):
    """Folded folders store a group's first block only, RPS folders the hashed memory and the uncompressed
    tensors: each loads as it is and is refused without one of the tensors its layout keeps."""
    from weightsmith import load
    from weightsmith.compressor.rps import compress_rps
    from weightsmith.errors import WeightsmithError

    folded = tmp_path / "folded"
    shutil.copytree(models["llama"], folded)
    resave(folded, drop(*[n for n in Checkpoint(folded).names() if n.startswith("model.layers.2.") and "norm" not in n]))
    set_config(folded, weightsmith={"format": "folded", "groups": [[0], [1, 2]], "block_prefix": "model.layers."})
    model = load(folded)
    assert model.model.layers[2].mlp.up_proj.weight is model.model.layers[1].mlp.up_proj.weight
    rps = tmp_path / "rps"
    compress_rps(models["llama"], rps, budget=0.5, device="cpu")
    load(rps)
    cases = [(folded, drop("model.layers.1.post_attention_layernorm.weight"), {}, "post_attention_layernorm"),
             (folded, lambda s: None, {"num_hidden_layers": 10**9}, "none for layer 3"),
             (rps, drop("model.layers.0.input_layernorm.weight"), {}, "input_layernorm")]
    for folder, tensors, config, word in cases:
        broken = tmp_path / f"broken-{word}"
        shutil.copytree(folder, broken)
        resave(broken, tensors)
        if config:
            set_config(broken, **config)
        with pytest.raises(WeightsmithError, match=word) as err:
            load(broken)
        assert str(broken) in str(err.value)
