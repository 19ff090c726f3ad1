"""The command line: help lists stages, --json is parseable, bad input is one line and exit 2."""
from __future__ import annotations

import json
import subprocess
import sys


def run(*args, check=True):
    proc = subprocess.run([sys.executable, "-m", "weightsmith", *map(str, args)], capture_output=True, text=True,
                          timeout=300)
    if check:
        assert proc.returncode == 0, proc.stderr
    return proc


def test_help_lists_stages_with_defaults():
    out = run("--help").stdout
    for cmd in ("inspect", "eval", "zoo", "export"):
        assert cmd in out
    assert "default: 8" in run("eval", "--help").stdout.replace("[", "").replace("]", "")


def test_inspect_and_eval_json(zoo):
    info = json.loads(run("inspect", zoo.model("base"), "--json").stdout)
    assert info["architecture"] == "LlamaForCausalLM" and info["layers"] == 4 and info["params"] > 300_000
    rows = json.loads(run("eval", zoo.model("base"), zoo.model("ft-prose"), "--data", zoo.data("prose"),
                          "--max-tokens", "600", "--device", "cpu", "--json").stdout)
    assert [r["model"] for r in rows] == [str(zoo.model("base")), str(zoo.model("ft-prose"))]
    assert all(r["perplexity"] > 1 and r["tokens"] == 599 for r in rows)


def test_bad_input_is_one_line_and_exit_2(tmp_path):
    (tmp_path / "config.json").write_text("{not json")
    proc = run("inspect", tmp_path, check=False)
    assert proc.returncode == 2
    lines = [ln for ln in proc.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1 and "config.json is not valid JSON" in lines[0]
    proc = run("eval", tmp_path / "nope", "--data", tmp_path / "x.txt", check=False)
    assert proc.returncode == 2 and "not found" in proc.stderr
