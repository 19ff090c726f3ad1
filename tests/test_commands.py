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


def _columns(table: str) -> list[str]:
    """Each column of a rendered table as one string: its cells' text on every line, joined."""
    rows = [[cell.strip() for cell in line.split("│")[1:-1]] for line in table.splitlines() if line.startswith("│")]
    return ["".join(row[i] for row in rows) for i in range(len(rows[0]))]


def test_tables_fold_long_names_at_80_columns_instead_of_cutting_them(zoo, tmp_path):
    import os
    import shutil

    long = tmp_path / ("a_fine_tune_with_a_long_descriptive_folder_name_" * 2 + "v2")
    shutil.copytree(zoo.model("base"), long)
    env = {**os.environ, "COLUMNS": "80"}
    for args in (["inspect", long], ["eval", long, zoo.model("ft-prose"), "--data", zoo.data("prose"),
                                     "--max-tokens", "200", "--device", "cpu", "--quiet"]):
        proc = subprocess.run([sys.executable, "-m", "weightsmith", *map(str, args)], capture_output=True,
                              text=True, timeout=300, env=env, cwd=tmp_path)
        assert proc.returncode == 0, proc.stderr
        assert max(map(len, proc.stdout.splitlines())) <= 80
        assert "…" not in proc.stdout and any(long.name in col for col in _columns(proc.stdout)), proc.stdout
