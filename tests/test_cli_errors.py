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
