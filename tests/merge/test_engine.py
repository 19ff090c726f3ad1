"""The streaming engine: validation before any tensor is read, vocab cropping, dtype, seeds, adapters, CLI."""
from __future__ import annotations

import hashlib
import json
import sys

import pytest
import torch
from safetensors.torch import save_file

from weightsmith.checkpoint import Checkpoint
from weightsmith.errors import WeightsmithError
from weightsmith.merge import merge, parse_recipe
from weightsmith.merge.recipe import recipe_from_flags


@pytest.fixture
def no_reads(monkeypatch):
    def refuse(self, name, *args, **kwargs):
        raise AssertionError(f"tensor {name} read before validation finished")
    for how in ("get", "read", "map"):
        monkeypatch.setattr(Checkpoint, how, refuse)


@pytest.mark.parametrize("case, message", [
    ("missing_input", "folder not found"),
    ("bad_density", r"parameter 'density': 1.5 is out of range; it must be in \[0, 1\]"),
    ("unknown_param", "has no parameter 'dnesity'"),
    ("unknown_method", "unknown merge_method"),
    ("no_base", "needs a base model"),
    ("arch", "num_hidden_layers"),
    ("shape", "has shape"),
    ("gradient_out_of_range", r"parameter 'density': 1.4 is out of range"),
    ("whole_model_trim_by_layer", "takes one density per model"),
])
def test_bad_recipes_refused_before_any_tensor_is_read(case, message, tiny_llama, tmp_path, no_reads):
    a, b = tiny_llama("a", seed=0), tiny_llama("b", seed=1)
    r = {
        "missing_input": recipe_from_flags("ties", [str(a), str(tmp_path / "nope")], str(a)),
        "bad_density": recipe_from_flags("ties", [str(b)], str(a), {"density": [1.5]}),
        "unknown_param": recipe_from_flags("ties", [str(b)], str(a), parameters={"dnesity": 0.3}),
        "unknown_method": recipe_from_flags("tis", [str(b)], str(a)),
        "no_base": recipe_from_flags("task_arithmetic", [str(b)]),
        "arch": recipe_from_flags("linear", [str(a), str(tiny_llama("c", num_hidden_layers=3))]),
        "shape": recipe_from_flags("linear", [str(a), str(tiny_llama("d", intermediate_size=40))], parameters={}),
        "gradient_out_of_range": recipe_from_flags("ties", [str(b)], str(a), {"density": [[0.5, 1.4]]}),
        "whole_model_trim_by_layer": recipe_from_flags("ties", [str(b)], str(a), {"density": [[0.2, 0.6]]}),
    }[case]
    with pytest.raises(WeightsmithError, match=message):
        merge(r, tmp_path / "out", allow_crimes=case == "shape")
    assert not (tmp_path / "out").exists()


def test_allow_crimes_lets_differing_configs_through(tiny_llama, tmp_path):
    a, b = tiny_llama("a"), tiny_llama("b", seed=1, rms_norm_eps=1e-5, max_position_embeddings=32)
    merge(recipe_from_flags("linear", [str(a), str(b)]), tmp_path / "out", allow_crimes=True)
    assert (tmp_path / "out" / "model.safetensors").exists()


def test_vocab_mismatch_is_cropped_to_common_rows(tiny_llama, tmp_path):
    a, b = tiny_llama("a", vocab_size=96), tiny_llama("b", seed=1, vocab_size=128)
    res = merge(recipe_from_flags("linear", [str(a), str(b)]), tmp_path / "out", allow_crimes=True)
    out = Checkpoint(tmp_path / "out")
    emb = "model.embed_tokens.weight"
    assert out.info(emb).shape[0] == 96 and out.config["vocab_size"] == 96
    want = (Checkpoint(a).get(emb) + Checkpoint(b).get(emb)[:96]) / 2
    assert torch.allclose(out.get(emb), want)
    assert any("cropped" in n for n in res["notes"])


def test_output_dtype_card_recipe_and_progress(tiny_llama, tmp_path):
    a, b = tiny_llama("a"), tiny_llama("b", seed=1)
    seen = []
    text = f"merge_method: slerp\nbase_model: {a}\nmodels:\n  - model: {b}\nparameters:\n  t: [0.1, 0.9]\n"
    merge(parse_recipe(text), tmp_path / "out", dtype="bfloat16", out_shard_size="20KB",
          progress=lambda label, done, total: seen.append((done, total)))
    out = Checkpoint(tmp_path / "out")
    assert len(out.files) > 1 and all(out.info(n).torch_dtype == torch.bfloat16 for n in out.names())
    assert seen[-1][0] == seen[-1][1] == len(out)
    assert (tmp_path / "out" / "weightsmith_recipe.yaml").read_text() == text
    assert "slerp" in (tmp_path / "out" / "README.md").read_text()
    from transformers import AutoModelForCausalLM
    AutoModelForCausalLM.from_pretrained(tmp_path / "out")


def test_dare_same_seed_same_output(tiny_llama, tmp_path):
    a, b, c = tiny_llama("a"), tiny_llama("b", seed=1), tiny_llama("c", seed=2)
    r = recipe_from_flags("dare_ties", [str(b), str(c)], str(a), {"density": [0.5]})
    outs = []
    for i, seed in enumerate((7, 7, 8)):
        merge(r, tmp_path / f"o{i}", seed=seed)
        outs.append(Checkpoint(tmp_path / f"o{i}").get("model.layers.0.mlp.up_proj.weight"))
    assert torch.equal(outs[0], outs[1]) and not torch.equal(outs[0], outs[2])


def _adapter(folder, seed, loss, step):
    folder.mkdir()
    g = torch.Generator().manual_seed(seed)
    save_file({"base_model.model.q_proj.lora_A.weight": torch.randn(4, 16, generator=g),
               "base_model.model.q_proj.lora_B.weight": torch.randn(16, 4, generator=g)},
              folder / "adapter_model.safetensors")
    (folder / "adapter_config.json").write_text(json.dumps({"r": 4, "target_modules": ["q_proj"], "peft_type": "LORA"}))
    (folder / "trainer_state.json").write_text(json.dumps(
        {"global_step": step, "log_history": [{"step": step, "loss": loss}]}))
    return folder


def test_mwa_on_lora_adapters_weights_by_inverse_loss(tmp_path):
    a, b = _adapter(tmp_path / "c1", 0, 4.0, 10), _adapter(tmp_path / "c2", 1, 1.0, 20)
    res = merge(recipe_from_flags("mwa", [str(a), str(b)], parameters={"p": 1.0}), tmp_path / "out")
    out = Checkpoint(tmp_path / "out")
    assert (tmp_path / "out" / "adapter_model.safetensors").exists() and (tmp_path / "out" / "adapter_config.json").exists()
    name = "base_model.model.q_proj.lora_A.weight"
    # m = 1/loss = 0.25 and 1.0 -> weights 0.2 and 0.8
    want = 0.2 * Checkpoint(a).get(name) + 0.8 * Checkpoint(b).get(name)
    assert torch.allclose(out.get(name), want, atol=1e-6)
    assert list(res["parameters"]["weights"].values()) == pytest.approx([0.2, 0.8])


def test_cli_merge_by_flags_and_one_line_error(tiny_llama, tmp_path, monkeypatch, capsys):
    from weightsmith.cli import main

    a, b = tiny_llama("a"), tiny_llama("b", seed=1)
    argv = ["weightsmith", "merge", "--method", "ties", "--base", str(a), "--model", str(b), "--density", "0.3",
            "-o", str(tmp_path / "out"), "--json", "--quiet"]
    monkeypatch.setattr(sys, "argv", argv)
    main()
    assert json.loads(capsys.readouterr().out)["method"] == "ties"
    monkeypatch.setattr(sys, "argv", argv[:8] + ["--density", "2", "-o", str(tmp_path / "o2")])
    with pytest.raises(SystemExit) as exc:
        main()
    assert exc.value.code == 2
    assert "density" in capsys.readouterr().err


def test_recipe_model_paths_expand_environment_variables(monkeypatch, tmp_path):
    from weightsmith.merge import parse_recipe

    monkeypatch.setenv("WS_MODELS", str(tmp_path))
    r = parse_recipe("merge_method: linear\nmodels:\n  - model: $WS_MODELS/a\n  - model: {model: \"${WS_MODELS}/b\"}\n")
    assert [m.path for m in r.models] == [str(tmp_path / "a"), str(tmp_path / "b")]


def _digests(folder):
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.iterdir()) if p.is_file()}


@pytest.mark.parametrize("method, params, global_params", [
    ("ties", {"density": 0.3}, {}), ("ties", {"density": 0.3}, {"trim": "tensor"}), ("task_arithmetic", {}, {}),
    ("dare_ties", {"density": 0.5}, {}), ("breadcrumbs_ties", {"density": 0.5, "gamma": 0.01}, {})])
def test_methods_writing_into_their_inputs_leave_the_input_files_alone(method, params, global_params, tiny_llama,
                                                                       tmp_path, monkeypatch):
    """On CPU the engine hands the methods copy-on-write mappings of the input files, which they overwrite;
    the embedding here (1M entries) also takes TIES' fused native path under trim: tensor."""
    base = tiny_llama("base", vocab_size=8192, hidden_size=128, intermediate_size=128)
    fts = [tiny_llama(f"ft{i}", seed=i + 1, vocab_size=8192, hidden_size=128, intermediate_size=128) for i in range(2)]
    before = {f: _digests(f) for f in (base, *fts)}
    recipe = recipe_from_flags(method, [str(f) for f in fts], str(base), {k: [v] for k, v in params.items()},
                               global_params)
    merge(recipe, tmp_path / "mapped", seed=3)
    assert {f: _digests(f) for f in before} == before
    # the same merge on tensors read into memory the plain way
    monkeypatch.setattr(Checkpoint, "map", lambda self, name, rows=None: self.read(name, rows))
    merge(recipe, tmp_path / "read", seed=3)
    a, b = Checkpoint(tmp_path / "mapped"), Checkpoint(tmp_path / "read")
    for name in a.names():
        assert torch.equal(a.get(name), b.get(name)), name
    assert not torch.equal(a.get("model.embed_tokens.weight"), Checkpoint(base).get("model.embed_tokens.weight"))


@pytest.mark.parametrize("method, extra", [("greedy_soup", {"data": "held-out.txt"}), ("pleas", {"width": 1.5}),
                                           ("greedy_soup", {"max_tokenz": 10})])
def test_a_whole_model_method_never_drops_an_option_in_silence(tiny_llama, tmp_path, method, extra):
    from weightsmith.merge import merge, parse_recipe

    a, b = tiny_llama("a"), tiny_llama("b", seed=1)
    with pytest.raises(WeightsmithError, match=f"method '{method}' takes no option '{next(iter(extra))}'"):
        merge(parse_recipe(f"merge_method: {method}\nmodels:\n  - model: {a}\n  - model: {b}\n"), tmp_path / "o",
              device="cpu", **extra)
    assert not (tmp_path / "o").exists()
