"""The align and pleas commands on Llama folders: same function after alignment, stock loading after PLeaS."""
from __future__ import annotations

import json

import pytest
import torch
from typer.testing import CliRunner

from weightsmith.cli import app


def _logits(path, ids):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(path).eval()(ids).logits


def test_aligned_zoo_base_b_gives_identical_logits(zoo, tmp_path):
    a, b = zoo.model("base"), zoo.model("base-b")
    data = zoo.data("general", "calib")
    ids = torch.randint(0, 1024, (2, 48))
    for method in ("weight", "activation"):
        out = tmp_path / method
        res = CliRunner().invoke(app, ["align", str(a), str(b), "--data", str(data), "-o", str(out), "--method",
                                       method, "--max-tokens", "1024", "--json", "-q"])
        assert res.exit_code == 0, res.output
        report = json.loads(res.output)
        assert report["units_moved"] > 0
        with torch.no_grad():
            assert torch.allclose(_logits(out, ids), _logits(b, ids), atol=1e-4)
        assert (out / "README.md").is_file() and (out / "tokenizer.json").is_file()


def test_pleas_output_loads_with_stock_from_pretrained(tiny_llama, tmp_path, zoo):
    a, b = tiny_llama("a", seed=0, vocab_size=1024), tiny_llama("b", seed=1, vocab_size=1024)
    data = tmp_path / "d.txt"
    data.write_text(" ".join(f"w{i % 37} x{i % 11}" for i in range(400)))
    from transformers import AutoTokenizer
    tok = AutoTokenizer.from_pretrained(str(zoo.model("base")))
    tok.save_pretrained(a)
    out = tmp_path / "merged"
    res = CliRunner().invoke(app, ["pleas", str(a), str(b), "--data", str(data), "--width", "1.5", "-o", str(out),
                                   "--seq-len", "16", "--json", "-q"])
    assert res.exit_code == 0, res.output
    report = json.loads(res.output)
    assert report["intermediate_size"] == 96  # 1.5 × 64
    config = json.loads((out / "config.json").read_text())
    assert config["intermediate_size"] == 96 and config["hidden_size"] == 32
    ids = torch.randint(0, 1024, (1, 12))
    assert torch.isfinite(_logits(out, ids)).all()
    assert "pleas" in (out / "README.md").read_text()


def test_bad_width_is_one_clear_error(tiny_llama, tmp_path):
    a = tiny_llama("a")
    res = CliRunner().invoke(app, ["pleas", str(a), str(a), "--data", str(a / "config.json"), "--width", "3",
                                   "-o", str(tmp_path / "o")])
    assert res.exit_code != 0
    assert str(res.exception) == "--width: 3.0 is out of range; it must be in [1, 2]"


def test_merge_method_pleas_runs_through_the_merge_command(tiny_llama, tmp_path, zoo):
    a, b = tiny_llama("a", seed=0, vocab_size=1024), tiny_llama("b", seed=1, vocab_size=1024)
    from transformers import AutoTokenizer
    AutoTokenizer.from_pretrained(str(zoo.model("base"))).save_pretrained(a)
    data = tmp_path / "d.txt"
    data.write_text(" ".join(f"w{i % 37} x{i % 11}" for i in range(300)))
    out = tmp_path / "m"
    res = CliRunner().invoke(app, ["merge", "--method", "pleas", "--model", str(a), "--model", str(b), "--data",
                                   str(data), "--width", "2.0", "--param", "seq_len=16", "-o", str(out), "-q"])
    assert res.exit_code == 0, res.output
    assert json.loads((out / "config.json").read_text())["intermediate_size"] == 128
    assert "merge_method: pleas" in (out / "weightsmith_recipe.yaml").read_text()


@pytest.mark.parametrize("which, tensor, value", [("b", "model.norm.weight", float("nan")),
                                                  ("a", "model.layers.1.mlp.up_proj.weight", float("inf")),
                                                  ("b", "model.embed_tokens.weight", float("-inf"))])
def test_align_refuses_non_finite_inputs_by_name_and_writes_nothing(tiny_llama, tmp_path, which, tensor, value):
    from safetensors.torch import load_file, save_file

    from weightsmith.errors import WeightsmithError
    from weightsmith.merge.align.folders import align

    folders = {"a": tiny_llama("a"), "b": tiny_llama("b", seed=1)}
    weights = load_file(folders[which] / "model.safetensors")
    weights[tensor].view(-1)[3] = value
    save_file(weights, folders[which] / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(WeightsmithError, match=f"{which}: tensor '{tensor}' holds 1 NaN/inf"):
        align(folders["a"], folders["b"], tmp_path / "out", method="weight", device="cpu")
    assert not (tmp_path / "out").exists()
