"""Usage errors and bad recipe files: one line on stderr, exit 2, no traceback, on every command."""
from __future__ import annotations

import pytest

from cli_check import cli as run, refused as one_line
from weightsmith.cli import app


def commands() -> list[str]:
    import typer

    group = typer.main.get_command(app)
    return sorted(group.commands)


def test_every_command_is_listed():
    assert {"inspect", "eval", "merge", "fold", "analyze", "run", "push", "compress"} <= set(commands())


@pytest.mark.parametrize("command", commands())
def test_an_unknown_option_names_itself_on_every_command(command, tmp_path):
    one_line(run(command, "--no-such-option", "1"), "No such option: --no-such-option", f"weightsmith {command}")


def test_unknown_commands_and_bad_values_are_one_line(tmp_path):
    one_line(run("--frobnicate"), "--frobnicate")
    one_line(run("melt"), "No such command", "melt")
    one_line(run("eval", tmp_path, "--max-tokens", "many"), "--max-tokens")


@pytest.mark.parametrize("text, words", [
    (b"merge_method: linear\nmodels:\n  - model: a\n  - model: b\ndtype: [1]\n", ("'dtype'", "[1]")),
    (b"merge_method: linear\nmodels:\n  - model: \xff\xfe\n", ("not UTF-8",)),
    (b"merge_method: [linear\n", ("not valid YAML",)),
])
def test_bad_recipe_files_are_one_line(tmp_path, text, words):
    recipe = tmp_path / "r.yml"
    recipe.write_bytes(text)
    one_line(run("merge", recipe, "-o", tmp_path / "out"), str(recipe), *words)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["r.yml"]


def test_a_pipeline_file_that_is_not_utf8_is_one_line(tmp_path):
    path = tmp_path / "p.yaml"
    path.write_bytes(b"stages:\n  - name: \xff\n")
    one_line(run("run", path, "--dry-run"), "not UTF-8")


def test_progress_in_a_log_prints_long_steps_every_interval_and_their_end():
    from weightsmith.cli.common import plain_progress

    now = [0.0]
    lines: list[str] = []
    progress = plain_progress(every=30, clock=lambda: now[0], write=lines.append)
    for t, done in [(0, 0), (10, 1), (31, 2), (45, 3), (62, 4), (70, 10)]:
        now[0] = t
        progress("heal", done, 10)
    now[0] = 71
    progress("write", 0, 1)
    progress("write", 1, 1)  # a short step: silent
    assert lines == ["heal: 2/10 (31 s)", "heal: 4/10 (62 s)", "heal: 10/10 (70 s)"]


def test_a_long_stage_logs_lines_when_stderr_is_a_file(zoo):
    import os
    import subprocess
    import sys

    env = {**os.environ, "WEIGHTSMITH_PROGRESS_EVERY": "0"}  # every step counts as long
    env.pop("WEIGHTSMITH_PROGRESS", None)
    args = [sys.executable, "-m", "weightsmith", "eval", zoo.model("base"), "--data", zoo.data("prose", "valid"),
            "--max-tokens", "300", "--json"]
    proc = subprocess.run(list(map(str, args)), env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-1000:]
    lines = proc.stderr.splitlines()
    assert lines and all(line.endswith(" s)") and "/" in line for line in lines), proc.stderr
    quiet = subprocess.run(list(map(str, args + ["-q"])), env=env, capture_output=True, text=True, timeout=600)
    assert quiet.returncode == 0 and quiet.stderr == ""
