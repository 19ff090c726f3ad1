"""Untrusted folders through every command that reads a model: one line, exit 2, inputs untouched, nothing
written, nothing read from outside the folder, no code run without --trust-remote-code; merge's value checks."""
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
from hostile import (cli, edit_header, first_tensor, index, nan_at, rename_shard, set_config, shards, sharded_copy,
                     split_file, to_dtype, write_index, write_raw)
from weightsmith.checkpoint import Checkpoint
from weightsmith.checkpoint.safetensors_file import save_file


def snapshot_except(root: Path, skip: list[Path]) -> dict:
    return {k: v for k, v in snapshot(root).items() if not any((root / k).is_relative_to(s) for s in skip)}


# -- the hostile folders ---------------------------------------------------------------------------
def outside_relative(m: Path, out: Path) -> list[str]:
    victim = shards(m)[1]
    (m.parent / "outside.safetensors").write_bytes((m / victim).read_bytes())
    (m / victim).unlink()
    rename_shard(m, victim, "../outside.safetensors")
    return ["outside the model folder"]


def outside_absolute(m: Path, out: Path) -> list[str]:
    victim = shards(m)[1]
    target = m.parent / "elsewhere" / victim
    target.parent.mkdir()
    (m / victim).rename(target)
    rename_shard(m, victim, str(target))
    return ["outside the model folder"]


def outside_symlink(m: Path, out: Path) -> list[str]:
    victim = shards(m)[1]
    (m / victim).rename(m.parent / "real.safetensors")
    (m / victim).symlink_to(m.parent / "real.safetensors")
    return ["symlink", "outside the model folder"]


def fifo_shard(m: Path, out: Path) -> list[str]:
    victim = shards(m)[1]
    (m / victim).unlink()
    os.mkfifo(m / victim)
    return ["not a regular file"]


def _first(m: Path, fn) -> None:
    edit_header(m / shards(m)[0], fn)


def offsets_float(m: Path, out: Path) -> list[str]:
    def fn(h):
        e = h[first_tensor(h)]
        e["data_offsets"] = [float(e["data_offsets"][0]), e["data_offsets"][1] + 0.5]
        return h
    _first(m, fn)
    return ["invalid offsets"]


def offsets_string(m: Path, out: Path) -> list[str]:
    def fn(h):
        e = h[first_tensor(h)]
        e["data_offsets"] = [str(v) for v in e["data_offsets"]]
        return h
    _first(m, fn)
    return ["invalid offsets"]


def metadata_list(m: Path, out: Path) -> list[str]:
    _first(m, lambda h: {**h, "__metadata__": ["format", "pt"]})
    return ["__metadata__"]


def shape_negative(m: Path, out: Path) -> list[str]:
    def fn(h):
        e = h[first_tensor(h)]
        e["shape"] = [-s for s in e["shape"][:1]] + [-s for s in e["shape"][1:]]
        return h
    _first(m, fn)
    return ["non-negative integers"]


def trailing_bytes(m: Path, out: Path) -> list[str]:
    with open(m / shards(m)[0], "ab") as f:
        f.write(b"\0" * 64)
    return ["trailing bytes"]


def truncated(m: Path, out: Path) -> list[str]:
    shard = m / shards(m)[-1]
    shard.write_bytes(shard.read_bytes()[:-100])
    return ["truncated"]


def header_nested(m: Path, out: Path) -> list[str]:
    shard = m / shards(m)[0]
    header, data = split_file(shard)
    raw = json.dumps(header).encode()[:-1] + b', "deep": ' + b"[" * 200_000 + b"]" * 200_000 + b"}"
    write_raw(shard, raw, data)
    return ["nested too deeply"]


def config_nested(m: Path, out: Path) -> list[str]:
    (m / "config.json").write_text('{"model_type": "llama", "x": ' + "[" * 200_000 + "]" * 200_000 + "}")
    return ["config.json", "too deeply"]


def index_number(m: Path, out: Path) -> list[str]:
    data = index(m)
    name = next(iter(data["weight_map"]))
    data["weight_map"][name] = 3
    write_index(m, data)
    return [name, "not a shard file name"]


def duplicate_tensor(m: Path, out: Path) -> list[str]:
    """A tensor of the first shard also stored (with other values) in the second: a loader taking the
    second copy would use wrong weights."""
    first, second = shards(m)[:2]
    ck = Checkpoint(m)
    name = next(n for n in ck.names() if ck.info(n).file.name == first)
    state = {n: ck.get(n).clone() for n in ck.names() if ck.info(n).file.name == second}
    state[name] = torch.full_like(ck.get(name), 7.0)
    ck.close()
    save_file(state, m / second)
    return [name, "appears in both"]


CORRUPT = [outside_relative, outside_absolute, outside_symlink, fifo_shard, offsets_float, offsets_string,
           metadata_list, shape_negative, trailing_bytes, truncated, header_nested, config_nested, index_number,
           duplicate_tensor]


# -- the commands ----------------------------------------------------------------------------------
def _pipeline(m: Path, other: Path, data: Path, out: Path) -> list:
    spec = out.parent / "pipe.yaml"
    spec.write_text(json.dumps({"workdir": str(out), "stages": [
        {"name": "scores", "stage": "eval", "inputs": [str(m)], "params": {"data": str(data)}}]}))
    return ["run", spec, "--device", "cpu", "--quiet"]


COMMANDS = {
    "inspect": lambda m, o, d, out: ["inspect", m],
    "eval": lambda m, o, d, out: ["eval", m, "--data", d, "--device", "cpu", "--quiet"],
    "analyze": lambda m, o, d, out: ["analyze", m, "--data", d, "--device", "cpu", "--quiet"],
    "fold": lambda m, o, d, out: ["fold", m, "-o", out, "--data", d, "--device", "cpu", "--quiet"],
    "compress": lambda m, o, d, out: ["compress", "rps", m, "-o", out, "--device", "cpu", "--quiet"],
    "align": lambda m, o, d, out: ["align", m, o, "-o", out, "--device", "cpu", "--quiet"],
    "pleas": lambda m, o, d, out: ["pleas", m, o, "--data", d, "-o", out, "--device", "cpu", "--quiet"],
    "merge": lambda m, o, d, out: ["merge", "--method", "linear", "--model", o, "--model", m, "-o", out, "--quiet"],
    "export": lambda m, o, d, out: ["export", m, "-o", out, "--quiet"],
    "push": lambda m, o, d, out: ["push", m, "someone/model", "--dry-run"],
    "run": _pipeline,
}


@pytest.fixture(scope="module")
def clean(tmp_path_factory):
    """A random two-layer Llama in several shards with an index, and a second one."""
    from weightsmith.zoo.synthetic import random_llama

    root = tmp_path_factory.mktemp("clean")
    a = sharded_copy(random_llama(root / "a-single"), root / "a")
    b = random_llama(root / "b", seed=1)
    assert len(shards(a)) >= 3
    return a, b


@pytest.fixture
def setup(clean, tmp_path):
    """(model folder to break, clean second model, data file, OUT path) under a fresh tmp_path."""
    m = tmp_path / "m" / "model"
    m.parent.mkdir()
    shutil.copytree(clean[0], m)
    other = tmp_path / "other"
    shutil.copytree(clean[1], other)
    data = tmp_path / "text.txt"
    data.write_text("some calibration text " * 50)
    return m, other, data, tmp_path / "out"


@pytest.mark.parametrize("command", list(COMMANDS))
@pytest.mark.parametrize("case", CORRUPT, ids=lambda f: f.__name__)
def test_corrupt_or_hostile_folder_is_one_line_exit_2_and_leaves_everything_as_it_was(
        case, command, setup, tmp_path, capsys, monkeypatch):
    m, other, data, out = setup
    expect = case(m, out)
    if command == "export":  # export reads folded/RPS folders: the same shards, declared folded
        set_config(m, weightsmith={"format": "folded", "groups": [[0], [1]]}) if case is not config_nested else None
    args = COMMANDS[command](m, other, data, out)
    skip = [out] if command == "run" else []  # run's OUT is its workdir, where it reports the failure
    before = snapshot_except(tmp_path, skip)
    proc = cli(capsys, monkeypatch, *args)
    refused(proc, *expect)
    assert snapshot_except(tmp_path, skip) == before  # inputs byte-identical, no OUT, no temp files anywhere


def test_a_merge_never_takes_values_from_a_shard_outside_the_folder(setup, tmp_path, capsys, monkeypatch):
    """The shard an index names outside is refused even when it is a perfectly good shard."""
    m, other, data, out = setup
    outside_relative(m, out)
    proc = cli(capsys, monkeypatch, "merge", "--method", "linear", "--model", m, "--model", other, "-o", out)
    refused(proc, "../outside.safetensors")
    assert not out.exists()


def test_the_validated_tensors_are_the_ones_loaded(clean):
    """``weightsmith.load`` builds the model from the checked tensors: same weights and logits as stock
    transformers on a clean folder."""
    from transformers import AutoModelForCausalLM

    from weightsmith import load

    a = AutoModelForCausalLM.from_pretrained(clean[0]).eval()
    b = load(clean[0])
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)
    x = torch.randint(0, 128, (2, 12))
    with torch.no_grad():
        assert torch.equal(a(x).logits, b(x).logits)


# -- custom code -------------------------------------------------------------------------------------
EVIL = '''
from pathlib import Path
Path({marker!r}).write_text("ran")
from transformers import LlamaConfig, LlamaForCausalLM


class EvilConfig(LlamaConfig):
    model_type = "llama"


class EvilModel(LlamaForCausalLM):
    config_class = EvilConfig
'''


def with_custom_code(m: Path, marker: Path, where: str = "config.json") -> None:
    (m / "evil.py").write_text(EVIL.format(marker=str(marker)))
    auto_map = {"AutoConfig": "evil.EvilConfig", "AutoModelForCausalLM": "evil.EvilModel"}
    if where == "config.json":
        set_config(m, auto_map=auto_map, architectures=["EvilModel"])
    else:
        (m / where).write_text(json.dumps({"auto_map": {"AutoTokenizer": ["evil.EvilTokenizer", None]}}))


def _shell(cmd: str, env_root: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "HF_MODULES_CACHE": str(env_root / "hf-modules"), "HF_HOME": str(env_root / "hf-home"),
           "TRANSFORMERS_VERBOSITY": "info"}
    return subprocess.run(["bash", "-c", cmd], capture_output=True, text=True, timeout=300, env=env)


@pytest.mark.parametrize("stdin", ["closed", "yes"])
def test_custom_code_never_runs_nor_prompts_without_trust_remote_code(stdin, setup, tmp_path):
    m, other, data, out = setup
    marker = tmp_path / "marker"
    with_custom_code(m, marker)
    before = snapshot(tmp_path)
    cmd = f"{sys.executable} -m weightsmith eval {m} --data {data} --device cpu"
    proc = _shell(f"exec {cmd} <&-" if stdin == "closed" else f"yes y | {cmd}", tmp_path)
    refused(proc, "auto_map", "evil.Evil", "--trust-remote-code")
    assert "[y/N]" not in proc.stdout + proc.stderr and proc.stdout == ""
    assert not marker.exists()
    assert snapshot(tmp_path) == before  # no module cache, no copy of evil.py anywhere


@pytest.mark.parametrize("command", ["eval", "analyze", "fold", "compress", "align", "pleas", "run"])
@pytest.mark.parametrize("where", ["config.json", "tokenizer_config.json"])
def test_every_loading_command_refuses_custom_code(command, where, setup, tmp_path, capsys, monkeypatch):
    m, other, data, out = setup
    marker = tmp_path / "marker"
    with_custom_code(m, marker, where)
    args = COMMANDS[command](m, other, data, out)
    skip = [out] if command == "run" else []
    before = snapshot_except(tmp_path, skip)
    proc = cli(capsys, monkeypatch, *args)
    refused(proc, where, "auto_map", "--trust-remote-code")
    assert not marker.exists() and snapshot_except(tmp_path, skip) == before


def test_trust_remote_code_runs_the_folders_code(setup, tmp_path):
    """The flag is the one way in: the same folder loads, through its own class, when it is given."""
    m, other, data, out = setup
    marker = tmp_path / "marker"
    with_custom_code(m, marker)
    proc = _shell(f"{sys.executable} -m weightsmith compress rps {m} -o {out} --budget 0.5 --device cpu "
                  f"--trust-remote-code --quiet <&-", tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert marker.read_text() == "ran" and (out / "config.json").is_file()


# -- merge value checks --------------------------------------------------------------------------------
TENSOR = "model.layers.0.mlp.up_proj.weight"


@pytest.fixture
def trio(clean, tmp_path):
    """Three single-file models: a (clean[0] values), b and c (other seeds)."""
    from weightsmith.zoo.synthetic import random_llama

    a = tmp_path / "in" / "a"
    shutil.copytree(clean[0], a)
    return a, random_llama(tmp_path / "in" / "b", seed=1), random_llama(tmp_path / "in" / "c", seed=2)


def _merge_args(method: str, a: Path, b: Path, c: Path) -> list:
    if method == "linear":
        return ["--method", "linear", "--model", a, "--model", b]
    if method == "slerp":
        return ["--method", "slerp", "--base", b, "--model", a]
    if method == "ties":
        return ["--method", "ties", "--base", b, "--model", a, "--model", c, "--density", "0.5"]
    return ["--method", "model_stock", "--base", b, "--model", a, "--model", c]


@pytest.mark.parametrize("value", [float("nan"), float("inf")], ids=["nan", "inf"])
@pytest.mark.parametrize("method", ["linear", "slerp", "ties", "model_stock"])
def test_nonfinite_input_is_refused_naming_model_and_tensor(method, value, trio, tmp_path, capsys, monkeypatch):
    a, b, c = trio
    nan_at(a, TENSOR, value)
    out = tmp_path / "out"
    before = snapshot(tmp_path)
    proc = cli(capsys, monkeypatch, "merge", *_merge_args(method, a, b, c), "-o", out, "--quiet")
    refused(proc, str(a), TENSOR, "NaN/inf", "--allow-nonfinite")
    assert snapshot(tmp_path) == before


def test_allow_nonfinite_reports_each_tensor_and_keeps_it(trio, tmp_path, capsys, monkeypatch):
    a, b, c = trio
    nan_at(a, TENSOR)
    out = tmp_path / "out"
    proc = cli(capsys, monkeypatch, "merge", "--method", "linear", "--model", a, "--model", b,
                            "-o", out, "--allow-nonfinite", "--json")
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout)["nonfinite"] == [{"model": str(a), "tensor": TENSOR, "nonfinite": 1}]
    merged = Checkpoint(out)
    assert torch.isnan(merged.get(TENSOR)).sum() == 1
    assert all(torch.isfinite(merged.get(n)).all() for n in merged.names() if n != TENSOR)
    proc = cli(capsys, monkeypatch, "merge", "--method", "linear", "--model", a, "--model", b,
                            "-o", out, "--allow-nonfinite", "--force")
    assert proc.returncode == 0 and f"{TENSOR!r} holds 1 NaN/inf" in proc.stdout


def test_all_zero_result_is_refused(trio, tmp_path, capsys, monkeypatch):
    a, b, c = trio
    twin = tmp_path / "in" / "twin"
    shutil.copytree(a, twin)
    out = tmp_path / "out"
    proc = cli(capsys, monkeypatch, "merge", "--method", "linear", "--model", a, "--model", twin,
                       "--weight", "1", "--weight", "-1", "--no-normalize", "-o", out)
    refused(proc, "all zeros", "weights")
    assert not out.exists()


def test_result_overflowing_the_output_dtype_is_refused(trio, tmp_path, capsys, monkeypatch):
    a, b, c = trio
    nan_at(a, TENSOR, 6.0e4)
    nan_at(b, TENSOR, 6.0e4)
    out = tmp_path / "out"
    proc = cli(capsys, monkeypatch, "merge", "--method", "linear", "--model", a, "--model", b,
                       "--no-normalize", "--dtype", "float16", "-o", out)
    refused(proc, TENSOR, "not finite although its inputs are")
    assert not out.exists()


def test_int_tensor_with_float_tensor_is_refused(trio, tmp_path, capsys, monkeypatch):
    a, b, c = trio
    to_dtype(b, TENSOR, torch.int32)
    for first, second in ((a, b), (b, a)):
        proc = cli(capsys, monkeypatch, "merge", "--method", "linear", "--model", first, "--model", second,
                           "-o", tmp_path / "out")
        refused(proc, str(b), TENSOR, "I32", "F32")
    assert not (tmp_path / "out").exists()


def test_weights_summing_to_zero_under_normalize_are_refused(trio, tmp_path, capsys, monkeypatch):
    a, b, c = trio
    proc = cli(capsys, monkeypatch, "merge", "--method", "linear", "--model", a, "--model", b,
                       "--weight", "1", "--weight", "-1", "-o", tmp_path / "out")
    refused(proc, "sum to 0", "normalize")
    assert not (tmp_path / "out").exists()


def config_contradicts_tensors(m: Path) -> list[str]:
    set_config(m, intermediate_size=128)
    return ["has shape [64, 32] but config.json makes it [128, 32]"]


def config_field_invalid(m: Path) -> list[str]:
    set_config(m, num_attention_heads="four")
    return ["config.json", "num_attention_heads"]


@pytest.mark.parametrize("command", ["eval", "analyze", "fold", "compress", "align"])
@pytest.mark.parametrize("case", [config_contradicts_tensors, config_field_invalid], ids=lambda f: f.__name__)
def test_a_config_that_does_not_fit_its_tensors_is_one_line(case, command, setup, tmp_path, capsys, monkeypatch):
    m, other, data, out = setup
    expect = case(m)
    before = snapshot(tmp_path)
    proc = cli(capsys, monkeypatch, *COMMANDS[command](m, other, data, out))
    refused(proc, *expect)
    assert snapshot(tmp_path) == before


def test_symlinks_that_stay_inside_the_folder_are_followed(setup, capsys, monkeypatch):
    m, other, data, out = setup
    victim = shards(m)[1]
    (m / "blobs").mkdir()
    (m / victim).rename(m / "blobs" / "abc123")
    (m / victim).symlink_to(Path("blobs") / "abc123")
    proc = cli(capsys, monkeypatch, "inspect", m, "--json")
    assert proc.returncode == 0, proc.stderr
    assert victim in json.loads(proc.stdout)["shards"]
    proc = cli(capsys, monkeypatch, "compress", "rps", m, "-o", out, "--budget", "0.5", "--device", "cpu",
                       "--quiet")
    assert proc.returncode == 0, proc.stderr


@pytest.mark.parametrize("name", ["trainer_state.json", "tokenizer.json"])
def test_side_files_leading_out_of_the_folder_are_refused(name, setup, tmp_path, capsys, monkeypatch):
    m, other, data, out = setup
    secret = tmp_path / "secret.json"
    secret.write_text("{}")
    (m / name).symlink_to(secret)
    proc = cli(capsys, monkeypatch, "merge", "--method", "linear", "--model", m, "--model", other, "-o", out)
    refused(proc, name, "outside the model folder")
    assert not out.exists()
