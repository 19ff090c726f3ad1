"""Hostile input costs bounded time and memory: YAML aliases are counted before anything is built, recipe and
pipeline files have a size limit, --data is read only as far as --max-tokens can need, and every network request
has a deadline for the whole exchange, not only for each read (that one: tests/pipeline/test_push.py)."""
from __future__ import annotations

import json
from pathlib import Path

import pytest

from cli_check import refused, snapshot
from hostile import cli

LISTS = "a: &a [x, x, x, x, x, x, x, x, x]\n" + "".join(
    f"{c}: &{c} [*{p}, *{p}, *{p}, *{p}, *{p}, *{p}, *{p}, *{p}, *{p}]\n" for p, c in zip("abcdefg", "bcdefgh"))
MERGE_KEYS = "m0: &m0 {k: [v, v, v, v, v, v, v, v, v, v]}\n" + "".join(
    f"m{i}: &m{i} {{" + ", ".join(f"k{j}: *m{i - 1}" for j in range(10)) + "}\n" for i in range(1, 7))
BOMBS = {"nested lists": LISTS, "nested mappings": MERGE_KEYS,
         "an alias inside itself": "loop: &loop [1, {again: *loop}]\n"}


@pytest.fixture
def model(tiny_llama):
    return tiny_llama("m")


def _pipeline(tmp_path: Path, model: Path, bomb: str) -> Path:
    """A pipeline whose eval stage has the bomb as a parameter's value."""
    spec = tmp_path / "pipe.yaml"
    data = tmp_path / "data.txt"
    data.write_text("some text to evaluate on. " * 20)
    value = "".join(f"        {line}\n" for line in bomb.splitlines())
    spec.write_text(f"workdir: {tmp_path / 'work'}\nstages:\n  - name: scores\n    stage: eval\n"
                    f"    inputs: [{model}]\n    params:\n      data: {data}\n      note:\n{value}")
    return spec


@pytest.mark.parametrize("bomb", sorted(BOMBS))
@pytest.mark.parametrize("dry_run", [False, True])
def test_a_yaml_bomb_is_refused_before_it_is_built(model, tmp_path, capsys, monkeypatch, bomb, dry_run):
    spec = _pipeline(tmp_path, model, BOMBS[bomb])
    before = snapshot(tmp_path)
    proc = cli(capsys, monkeypatch, "run", spec, "-q", *(["--dry-run"] if dry_run else []))
    refused(proc, str(spec), "expands to more than")
    assert snapshot(tmp_path) == before


@pytest.mark.parametrize("bomb", sorted(BOMBS))
def test_a_recipe_or_merge_parameter_bomb_is_refused(model, tmp_path, capsys, monkeypatch, bomb):
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(BOMBS[bomb] + f"merge_method: linear\nmodels:\n  - model: {model}\n  - model: {model}\n")
    refused(cli(capsys, monkeypatch, "merge", recipe, tmp_path / "out", "-q"), "expands to more than")
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("what", ["recipe", "pipeline file", "recipe of comments"])
def test_text_files_past_the_size_limit_are_refused_unread(model, tmp_path, capsys, monkeypatch, what):
    from weightsmith.checkpoint.textfile import MAX_TEXT_FILE

    path = tmp_path / "big.yaml"
    filler = "# padding\n" * (MAX_TEXT_FILE // 10 + 1) if what == "recipe of comments" else \
        "pad: [" + ", ".join(["0"] * (MAX_TEXT_FILE // 3)) + "]\n"
    path.write_text(filler + f"merge_method: linear\nmodels:\n  - model: {model}\n")
    args = ["run", path, "--dry-run"] if what == "pipeline file" else ["merge", path, tmp_path / "out", "-q"]
    refused(cli(capsys, monkeypatch, *args), str(path), "larger than")


@pytest.mark.parametrize("kind", ["one line", "one jsonl record", "a folder of files"])
def test_data_is_read_only_as_far_as_max_tokens_can_need(tmp_path, kind):
    from weightsmith.data import CHARS_PER_TOKEN, load_texts

    text = "word " * 400_000
    if kind == "one line":
        (tmp_path / "d.txt").write_text(text)
    elif kind == "one jsonl record":
        (tmp_path / "d.jsonl").write_text(json.dumps({"text": text}) + "\n" + json.dumps({"text": "more"}) + "\n")
    else:
        for i in range(5):
            (tmp_path / f"part{i}.txt").write_text(text)
    path = tmp_path if kind == "a folder of files" else next(tmp_path.iterdir())
    for max_tokens in (10, 1000):
        texts = load_texts(path, max_tokens=max_tokens)
        assert sum(map(len, texts)) == max_tokens * CHARS_PER_TOKEN and texts[0] == text[:len(texts[0])]
    assert sum(map(len, load_texts(path))) >= len(text)  # without a budget, everything
