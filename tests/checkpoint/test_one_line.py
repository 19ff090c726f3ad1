"""Hostile text, side files, option values and data through the command line: each is one error line (exit 2, no
traceback), and folder text is printed as it is, never read as markup or passed to the terminal as control codes."""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from cli_check import refused, snapshot
from hostile import cli, resave, set_config, to_dtype
from test_outputs import _namespace_ok
from weightsmith.checkpoint import Checkpoint

NAMES = ["[/]", "[bold red]loud[/]", "a\x1b]0;title\x07b", "c\x1b[2Jd\u202eevil"]


@pytest.fixture(scope="module")
def folders(tmp_path_factory, zoo):
    """A random Llama with the zoo's tokenizer, a second one, and a text file to evaluate on."""
    from weightsmith.zoo.synthetic import random_llama

    root = tmp_path_factory.mktemp("oneline")
    tok = zoo.model("base")
    a = random_llama(root / "a", tokenizer_from=tok)
    b = random_llama(root / "b", seed=1, tokenizer_from=tok)
    data = root / "data.txt"
    data.write_text("the quick brown fox jumps over the lazy dog. " * 40)
    return {"a": a, "b": b, "data": data}


def copy(folder: Path, tmp_path: Path, name: str) -> Path:
    return Path(shutil.copytree(folder, tmp_path / name))


def test_folder_text_is_shown_as_it_is_never_as_markup_or_control_codes(folders, tmp_path, capsys, monkeypatch):
    m = copy(folders["a"], tmp_path, "m")

    def plant(state):
        first = next(iter(state))
        for i, name in enumerate(NAMES):
            state[name] = state[first][:1].clone() + i

    resave(m, plant)
    proc = cli(capsys, monkeypatch, "inspect", m, "--tensors")
    assert proc.returncode == 0, proc.stderr
    for shown in ["[/]", "[bold red]loud[/]", "a\\x1b]0;title\\x07b", "c\\x1b[2Jd\\u202eevil"]:
        assert shown in proc.stdout
    assert "\x1b" not in proc.stdout and "\x07" not in proc.stdout and "\u202e" not in proc.stdout
    for name in NAMES:  # the error printer too: a message holding folder text
        line = refused(cli(capsys, monkeypatch, "inspect", tmp_path / f"missing{name}"), "missing")
        assert "\x1b" not in line and "\x07" not in line and name.split("\x1b")[0] in line


def _tokenizer(folder: Path, change) -> None:
    data = json.loads((folder / "tokenizer.json").read_text())
    change(data)
    (folder / "tokenizer.json").write_text(json.dumps(data))


def _split(pattern: str):
    return lambda t: t.update(pre_tokenizer={"type": "Split", "pattern": {"Regex": pattern}, "behavior": "Isolated",
                                             "invert": False})


@pytest.mark.parametrize("change, words", [
    (_split("[z-a]"), ["does not compile"]),
    (_split(r"(\s*\w+)*!"), ["exponential"]),
    (_split(r"(?:ab|a){2,}c"), ["exponential"]),
    (lambda t: t.update(normalizer={"type": "Replace", "pattern": {"Regex": "(x+x+)+y"}, "content": ""}),
     ["exponential"]),
    (lambda t: t.update(extra=json.loads("[" * 150 + "]" * 150)), ["levels deep"]),
])
def test_a_hostile_tokenizer_is_one_line(folders, tmp_path, capsys, monkeypatch, change, words):
    m = copy(folders["a"], tmp_path, "m")
    _tokenizer(m, change)
    before = snapshot(tmp_path)
    refused(cli(capsys, monkeypatch, "eval", m, "--data", folders["data"], "--device", "cpu", "-q"),
            "tokenizer.json", *words)
    assert snapshot(tmp_path) == before


def test_real_tokenizers_pass_the_regex_check(zoo):
    """The split rules real tokenizers use (byte-level GPT-2 style, MiniLM's WordPiece) are not refused."""
    from weightsmith.checkpoint.patterns import check_pattern
    from weightsmith.checkpoint.tokenizer_files import load_tokenizer
    from weightsmith.zoo import minilm_path

    gpt2 = r"""'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"""
    llama3 = (r"""(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|"""
              r"""\s*[\r\n]+|\s+(?!\S)|\s+""")
    from tokenizers import Regex

    for pattern in (gpt2, llama3):
        check_pattern(pattern, "test", compile_with=Regex)
    assert load_tokenizer(minilm_path())("hello world")["input_ids"]


ADAPTER_BAD = [({"r": "four"}, "'r'"), ({"target_modules": 5}, "'target_modules'"),
               ({"alpha_pattern": {"(q+)+_proj": 16}}, "exponential"), ({"rank_pattern": {"[": 4}}, "does not compile"),
               ({"lora_alpha": float("inf")}, "'lora_alpha'")]


@pytest.mark.parametrize("change, word", ADAPTER_BAD)
def test_a_malformed_adapter_config_is_one_line(folders, tmp_path, capsys, monkeypatch, change, word):
    adapter = tmp_path / "adapter"
    adapter.mkdir()
    good = {"peft_type": "LORA", "r": 4, "lora_alpha": 8, "target_modules": ["q_proj"], "alpha_pattern": {},
            "rank_pattern": {}}
    config = {**good, **change}
    (adapter / "adapter_config.json").write_text(json.dumps(config))
    torch.manual_seed(0)
    from weightsmith.checkpoint.safetensors_file import save_file

    prefix = "base_model.model.model.layers.0.self_attn.q_proj"
    width = Checkpoint(folders["a"]).info("model.layers.0.self_attn.q_proj.weight").shape
    save_file({f"{prefix}.lora_A.weight": torch.randn(4, width[1]), f"{prefix}.lora_B.weight": torch.randn(width[0], 4)},
              adapter / "adapter_model.safetensors")
    monkeypatch.setenv("WEIGHTSMITH_CACHE", str(tmp_path / "cache"))
    refused(cli(capsys, monkeypatch, "inspect", f"{folders['a']}+{adapter}"), "adapter_config.json", word)
    other = Path(shutil.copytree(adapter, tmp_path / "adapter2"))
    (other / "adapter_config.json").write_text(json.dumps({**config, **{k: good[k] for k in change}}))
    refused(cli(capsys, monkeypatch, "merge", "--method", "linear", "--model", other, "--model", adapter,
                "-o", tmp_path / "out", "-q"), "adapter_config.json", word)
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("change, word", [
    ({"architectures": 3}, "architectures"), ({"architectures": ["pipeline"]}, "pipeline"),
    ({"hidden_size": "64"}, "hidden_size"), ({"model_type": ["llama"]}, "model_type"),
])
def test_config_fields_of_the_wrong_type_are_one_line(folders, tmp_path, capsys, monkeypatch, change, word):
    m = copy(folders["a"], tmp_path, "m")
    set_config(m, **change)
    refused(cli(capsys, monkeypatch, "eval", m, "--data", folders["data"], "--device", "cpu", "-q"), "config.json",
            word)
    if word != "pipeline":  # a name is only known not to be a model class once transformers is asked
        refused(cli(capsys, monkeypatch, "inspect", m), "config.json", word)


@pytest.mark.parametrize("args, flag", [
    (["--heal-lr", "nan"], "--heal-lr"), (["--seed", str(2**64 + 1)], "--seed"), (["--seed", "-1"], "--seed"),
    (["--seed", str(2**32)], "--seed"),
])
def test_option_values_nothing_can_use_are_one_line(folders, tmp_path, capsys, monkeypatch, args, flag):
    refused(cli(capsys, monkeypatch, "fold", folders["a"], "-o", tmp_path / "out", "--data", folders["data"],
                "--device", "cpu", "-q", *args), flag)
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("name, body, option, word", [
    ("bad.jsonl", b'{"text": "fine"}\n{"text": "\xff\xfe"}\n', "--data", ":2: not UTF-8"),
    ("deep.jsonl", b'{"text": ' + b"[" * 100_000 + b"]" * 100_000 + b"}\n", "--data", "nested too deeply"),
    ("bad.csv", b"text,label\nhello,1\n\xc3(,0\n", "--labelled", ":3: not UTF-8"),
    ("wide.csv", b"text,label\n\"" + b"x" * 200_000 + b"\",1\n", "--labelled", "not valid CSV"),
])
def test_data_files_that_are_not_text_or_too_deep_are_one_line(folders, tmp_path, capsys, monkeypatch, name, body,
                                                                 option, word):
    (tmp_path / name).write_bytes(body)
    refused(cli(capsys, monkeypatch, "eval", folders["a"], option, tmp_path / name, "--device", "cpu", "-q"),
            name, word)


@pytest.mark.parametrize("dtype", [torch.float8_e4m3fn, torch.float8_e5m2, torch.uint16, torch.uint32])
def test_merge_refuses_dtypes_it_cannot_check_by_name(folders, tmp_path, capsys, monkeypatch, dtype):
    m = copy(folders["a"], tmp_path, "m")
    name = "model.layers.0.mlp.up_proj.weight"
    to_dtype(m, name, dtype)
    for args in (["--method", "linear", "--model", m, "--model", folders["b"]],
                 ["--method", "ties", "--base", folders["b"], "--model", m, "--model", folders["a"]]):
        refused(cli(capsys, monkeypatch, "merge", *args, "-o", tmp_path / "out", "-q"), name, "convert")
    assert not (tmp_path / "out").exists()


@pytest.mark.skipif(not _namespace_ok(), reason="needs `unshare -rm` to mount a private tmpfs")
@pytest.mark.parametrize("force", [False, True])
def test_an_output_on_a_mount_point_is_refused_before_computing(folders, tmp_path, force):
    mount = tmp_path / "mnt"
    mount.mkdir()
    cmd = (f"{sys.executable} -m weightsmith merge --method linear --model {folders['a']} --model {folders['b']} "
           f"-o {mount} -q{' --force' if force else ''}")
    proc = subprocess.run(["unshare", "-rm", "sh", "-c", f"mount -t tmpfs tmpfs {mount} && {cmd}"],
                          capture_output=True, text=True, timeout=300, env={**os.environ})
    refused(proc, "mount point")
