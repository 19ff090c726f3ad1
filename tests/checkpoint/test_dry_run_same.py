"""run --dry-run is the real run's validation: each hostile input that a real run refuses (tokenizers, configs,
adapter configs, data files, dtypes merge cannot check, option values) is refused by the dry run with the same
line, and by the real run before any stage computes."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
import yaml

from cli_check import refused, snapshot
from hostile import cli, set_config, to_dtype


@pytest.fixture(scope="module")
def made(tmp_path_factory, zoo):
    from weightsmith.zoo.synthetic import random_llama

    root = tmp_path_factory.mktemp("dry")
    tok = zoo.model("base")
    return {"a": random_llama(root / "a", tokenizer_from=tok), "b": random_llama(root / "b", seed=1, tokenizer_from=tok)}


def _split_rule(m: Path, pattern: str) -> None:
    data = json.loads((m / "tokenizer.json").read_text())
    data["pre_tokenizer"] = {"type": "Split", "pattern": {"Regex": pattern}, "behavior": "Isolated", "invert": False}
    (m / "tokenizer.json").write_text(json.dumps(data))


def tokenizer_regex(m, root):
    _split_rule(m, r"(\w+\s?)*$")
    return {"stage": "eval", "input": str(m), "params": {"data": str(root / "text.txt")}}, "exponential"


def tokenizer_deep(m, root):
    data = json.loads((m / "tokenizer.json").read_text())
    data["decoder"] = json.loads('{"x": ' * 120 + "1" + "}" * 120)
    (m / "tokenizer.json").write_text(json.dumps(data))
    return {"stage": "fold", "input": str(m), "params": {"data": str(root / "text.txt")}}, "levels deep"


def tokenizer_config_deep(m, root):
    (m / "tokenizer_config.json").write_text('{"model_max_length": ' + "[" * 100_000 + "]" * 100_000 + "}")
    return {"stage": "eval", "input": str(m), "params": {"data": str(root / "text.txt")}}, "too deeply"


def architecture_function(m, root):
    set_config(m, architectures=["set_seed"])
    return {"stage": "eval", "input": str(m), "params": {"data": str(root / "text.txt")}}, "architectures"


def adapter_config(m, root):
    adapter = root / "adapter"
    adapter.mkdir()
    (adapter / "adapter_config.json").write_text(json.dumps({"peft_type": "LORA", "r": [4], "lora_alpha": 8}))
    return {"stage": "eval", "input": f"{m}+{adapter}", "params": {"data": str(root / "text.txt")}}, "'r'"


def data_not_utf8(m, root):
    (root / "bad.jsonl").write_bytes(b'{"text": "ok"}\n' * 3 + b'{"text": "\xe9t\xe9"}\n')
    return {"stage": "eval", "input": str(m), "params": {"data": str(root / "bad.jsonl")}}, ":4: not UTF-8"


def labelled_too_deep(m, root):
    (root / "deep.jsonl").write_text('{"text": "a", "label": 1}\n{"text": ' + "[" * 50_000 + "]" * 50_000 + "}\n")
    return {"stage": "eval", "input": str(m), "params": {"labelled": str(root / "deep.jsonl")}}, "nested too deeply"


def float8_merge(m, root):
    to_dtype(m, "model.layers.1.self_attn.o_proj.weight", torch.float8_e5m2)
    return {"stage": "merge", "inputs": [str(m), str(root / "b")], "params": {"method": "linear"}}, "F8_E5M2"


def nan_option(m, root):
    return {"stage": "fold", "input": str(m), "params": {"data": str(root / "text.txt"), "heal_lr": float("nan")}}, \
        "heal_lr"


CASES = [tokenizer_regex, tokenizer_deep, tokenizer_config_deep, architecture_function, adapter_config, data_not_utf8, labelled_too_deep,
         float8_merge, nan_option]


@pytest.mark.parametrize("case", CASES, ids=lambda c: c.__name__)
def test_the_dry_run_refuses_what_the_real_run_refuses(made, tmp_path, capsys, monkeypatch, case):
    m = Path(shutil.copytree(made["a"], tmp_path / "m"))
    shutil.copytree(made["b"], tmp_path / "b")
    (tmp_path / "text.txt").write_text("the quick brown fox jumps over the lazy dog. " * 30)
    stage, word = case(m, tmp_path)
    spec = tmp_path / "p.yaml"
    spec.write_text(yaml.safe_dump({"workdir": str(tmp_path / "work"),
                                    "stages": [{"name": "one", **stage}]}, sort_keys=False))
    before = snapshot(tmp_path)
    dry = refused(cli(capsys, monkeypatch, "run", spec, "--dry-run", "--device", "cpu", "-q"), word)
    assert snapshot(tmp_path) == before
    real = refused(cli(capsys, monkeypatch, "run", spec, "--device", "cpu", "-q"), word)
    assert real == dry
    assert not (tmp_path / "work" / "one").exists()
