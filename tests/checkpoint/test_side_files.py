"""Input side files that feed an output's model card: read only inside the gate, and a broken one never costs the
finished output (the card says it was not used)."""
from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest

from hostile import cli, set_config

ALIAS_BOMB = "a: &a [x, x, x, x, x, x, x, x]\n" + "".join(
    f"{c}: &{c} [*{p}, *{p}, *{p}, *{p}, *{p}, *{p}, *{p}, *{p}]\n" for p, c in zip("abcdefg", "bcdefgh"))
BROKEN = {  # README.md bytes, and the reason the card gives
    "a rule, then unclosed YAML": (b"---\nbase_model: [org/one,\n  - two\n---\n# Title\n", "not YAML"),
    "latin-1 front matter": ("---\nbase_model: org/caf\u00e9\n---\n".encode("latin-1"), "not UTF-8"),
    "an alias bomb": (f"---\n{ALIAS_BOMB}base_model: org/bomb\n---\n".encode(), "not YAML"),
    "flow nesting past any parser": (b"---\nbase_model: " + b"[" * 5000 + b"]" * 5000 + b"\n---\n", "not YAML"),
}


@pytest.fixture(scope="module")
def made(tmp_path_factory, zoo):
    from weightsmith.zoo.synthetic import random_llama

    root = tmp_path_factory.mktemp("side")
    data = root / "data.txt"
    data.write_text("the quick brown fox jumps over the lazy dog. " * 40)
    return {"a": random_llama(root / "a", tokenizer_from=zoo.model("base")), "b": random_llama(root / "b", seed=1),
            "data": data}


COMMANDS = {
    "merge": lambda m, o, d, out: ["merge", "--method", "linear", "--model", m, "--model", o, "-o", out, "-q"],
    "fold": lambda m, o, d, out: ["fold", m, "-o", out, "--data", d, "--max-tokens", "256", "--seq-len", "32",
                                  "--device", "cpu", "-q"],
    "compress": lambda m, o, d, out: ["compress", "rps", m, "-o", out, "--device", "cpu", "-q"],
}


@pytest.mark.parametrize("command", sorted(COMMANDS))
def test_a_broken_input_card_never_costs_the_output(made, tmp_path, capsys, monkeypatch, command):
    for i, (kind, (body, why)) in enumerate(sorted(BROKEN.items())):
        m = Path(shutil.copytree(made["a"], tmp_path / f"in{i}"))
        (m / "README.md").write_bytes(body)
        out = tmp_path / f"out{i}"
        proc = cli(capsys, monkeypatch, *COMMANDS[command](m, made["b"], made["data"], out))
        assert proc.returncode == 0, (kind, proc.stderr)
        card = (out / "README.md").read_text()
        assert f"input `{m}` was not used: " in card and why in card, (kind, card)
        assert "org/" not in card.split("---")[1]  # nothing from the broken front matter became metadata


def test_an_input_card_outside_its_folder_is_never_read(made, tmp_path, capsys, monkeypatch):
    outside = tmp_path / "elsewhere"
    outside.mkdir()
    (outside / "card.md").write_text("---\nbase_model: org/leaked\n---\nprivate text\n")
    (outside / "sub").mkdir()
    links = {"absolute": outside / "card.md", "relative": Path("..") / "elsewhere" / "card.md",
             "through a folder link": Path("inner") / "card.md"}
    for i, (kind, target) in enumerate(links.items()):
        m = Path(shutil.copytree(made["a"], tmp_path / f"in{i}"))
        if kind == "through a folder link":
            (m / "inner").symlink_to(outside, target_is_directory=True)
        (m / "README.md").symlink_to(target)
        proc = cli(capsys, monkeypatch, "merge", "--method", "linear", "--model", m, "--model", made["b"],
                   "-o", tmp_path / f"out{i}", "-q")
        assert proc.returncode == 0, proc.stderr
        card = (tmp_path / f"out{i}" / "README.md").read_text()
        assert "leaked" not in card and "private" not in card and "not a regular file inside the folder" in card


@pytest.mark.parametrize("where", ["absolute", "relative", "hub-like name"])
def test_push_never_reads_the_card_its_config_points_at(made, tmp_path, monkeypatch, where):
    """config.json's _name_or_path is the folder's own text: the upload card names it, never opens it."""
    from weightsmith.checkpoint.hub import plan_push

    victim = tmp_path / "org" / "victim"
    victim.mkdir(parents=True)
    (victim / "README.md").write_text("---\nbase_model: org/leaked\n---\nprivate notes\n")
    (victim / "config.json").write_text("{}")
    m = Path(shutil.copytree(made["b"], tmp_path / "model"))
    monkeypatch.chdir(tmp_path)
    name = {"absolute": str(victim), "relative": "./" + os.path.relpath(victim, tmp_path), "hub-like name": "org/victim"}
    set_config(m, _name_or_path=name[where])
    card = plan_push(m)["card"]
    assert "leaked" not in card and "private" not in card and name[where] in card
