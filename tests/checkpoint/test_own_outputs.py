"""weightsmith deletes and overwrites only what it wrote: the replace journal, the lock and the temp folders
live beside OUT in a private folder and name only what the writer generated; --force and `run` replace only
folders weightsmith wrote; a planted journal, link or look-alike folder is never followed nor deleted."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from cli_check import precious, refused, snapshot
from hostile import cli
from weightsmith.checkpoint.writer import MARKER, check_output, output_folder
from weightsmith.errors import WeightsmithError


def dead_pid() -> int:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


def written(folder: Path, text: str = "ours") -> Path:
    """A folder as weightsmith writes it (the marker inside)."""
    with output_folder(folder, force=folder.exists()) as tmp:
        (tmp / "v.txt").write_text(text)
    return folder


def plant_journal(tmp_path: Path, new: str, old: str) -> None:
    lock = tmp_path / ".out.weightsmith-lock"
    lock.mkdir(mode=0o700, exist_ok=True)
    (lock / "replace.json").write_text(json.dumps({"new": new, "old": old}))


# each plants a journal (in OUT's own private lock folder) that names something the writer never generated
JOURNALS = {
    "names-a-sibling-folder": lambda t: plant_journal(t, "out.tmp-1-0000000a", "mine"),
    "names-a-path-outside": lambda t: plant_journal(t, "out.tmp-1-0000000a", "../mine"),
    "generated-name-linking-out": lambda t: (
        (t / f"out.old-{dead_pid()}-0000000b").symlink_to(t / "mine"),
        plant_journal(t, "out.tmp-1-0000000a", next(p.name for p in t.iterdir() if p.name.startswith("out.old-")))),
    "old-style-journal-beside-out": lambda t: (t / ".out.weightsmith-replace").write_text(
        json.dumps({"new": "out.tmp-1-0000000a", "old": "mine"})),
}


@pytest.mark.parametrize("case", list(JOURNALS))
def test_a_planted_journal_never_deletes_or_moves_anything(case, tmp_path):
    root = tmp_path / "root"
    mine = precious(root / "mine")
    out = written(root / "out")
    JOURNALS[case](root)
    before = snapshot(mine)
    written(out, "new")
    assert snapshot(mine) == before and (out / "v.txt").read_text() == "new"


LOCKS = {
    "lock-folder-is-a-link": lambda t: (t / ".out.weightsmith-lock").symlink_to(t / "mine"),
    "lock-folder-open-to-all": lambda t: (t / ".out.weightsmith-lock").mkdir(mode=0o777) or
    os.chmod(t / ".out.weightsmith-lock", 0o777),
    "lock-file-is-a-link": lambda t: ((t / ".out.weightsmith-lock").mkdir(mode=0o700),
                                      (t / ".out.weightsmith-lock" / "lock").symlink_to(t / "mine" / "notes.txt")),
}


@pytest.mark.parametrize("case", list(LOCKS))
def test_a_planted_lock_is_refused_and_never_written_through(case, tmp_path):
    mine = precious(tmp_path / "mine")
    LOCKS[case](tmp_path)
    before = snapshot(mine)
    with pytest.raises(WeightsmithError, match="cannot lock"):
        check_output(tmp_path / "out")
    assert snapshot(mine) == before and not (tmp_path / "out").exists()


def test_the_lock_is_beside_out_whatever_the_temp_dir(tmp_path):
    """Two runs with different TMPDIRs still exclude each other."""
    out = tmp_path / "out"
    hold = ("import sys, time\nfrom weightsmith.checkpoint import check_output\ncheck_output(sys.argv[1])\n"
            "print('holding', flush=True)\ntime.sleep(60)")
    env = {**os.environ, "TMPDIR": str(tmp_path / "t1")}
    (tmp_path / "t1").mkdir()
    holder = subprocess.Popen([sys.executable, "-c", hold, str(out)], stdout=subprocess.PIPE, text=True, env=env)
    try:
        assert holder.stdout.readline().strip() == "holding"
        os.environ["TMPDIR"], saved = str(tmp_path), os.environ.get("TMPDIR")
        try:
            with pytest.raises(WeightsmithError, match=f"pid {holder.pid}"):
                check_output(out)
        finally:
            os.environ.pop("TMPDIR") if saved is None else os.environ.__setitem__("TMPDIR", saved)
    finally:
        holder.kill()
        holder.wait()


# folders that --force must never delete: none was written by weightsmith
FOREIGN = {
    "a-git-project": precious,
    "a-model-folder-weightsmith-did-not-write": lambda f: (f.mkdir(parents=True),
                                                           (f / "config.json").write_text("{}"),
                                                           (f / "README.md").write_text("---\nlibrary_name: x\n---\n")),
    "a-marker-that-is-a-link": lambda f: (precious(f), (f / MARKER).symlink_to(f / "notes.txt")),
}


@pytest.mark.parametrize("case", list(FOREIGN))
def test_force_never_deletes_a_folder_weightsmith_did_not_write(case, tiny_llama, tmp_path, capsys, monkeypatch):
    a, b = tiny_llama("a"), tiny_llama("b", seed=1)
    out = tmp_path / "out"
    FOREIGN[case](out)
    before = snapshot(tmp_path)
    proc = cli(capsys, monkeypatch, "merge", "--method", "linear", "--model", a, "--model", b, "-o", out, "--force",
               "--quiet")
    refused(proc, str(out), "not written by weightsmith", "never replaced")
    assert snapshot(tmp_path) == before


def test_force_replaces_what_weightsmith_wrote(tiny_llama, tmp_path, capsys, monkeypatch):
    a, b = tiny_llama("a"), tiny_llama("b", seed=1)
    out = tmp_path / "out"
    for _ in range(2):
        proc = cli(capsys, monkeypatch, "merge", "--method", "linear", "--model", a, "--model", b, "-o", out,
                   "--force", "--quiet")
        assert proc.returncode == 0, proc.stderr
    assert (out / MARKER).is_file() and sorted(p.name for p in tmp_path.iterdir()) == ["a", "b", "out"]


def test_stale_look_alikes_of_temp_folders_are_kept(tmp_path):
    """Only a dead run's temp folder holding the marker (or nothing) is removed; links and the user's own
    folders that merely look like one stay."""
    pid = dead_pid()
    mine = precious(tmp_path / "mine")
    link = tmp_path / f"out.tmp-{pid}-0000000c"
    link.symlink_to(mine)
    lookalike = precious(tmp_path / f"out.old-{pid}-0000000d")
    stale = tmp_path / f"out.tmp-{pid}-0000000e"
    stale.mkdir()
    (stale / MARKER).write_text("weightsmith\n")
    written(tmp_path / "out")
    assert link.is_symlink() and (lookalike / "notes.txt").is_file() and not stale.exists()
    assert (mine / "notes.txt").read_text() == "mine"


def _pipeline(tmp_path: Path, name: str, stage: dict) -> Path:
    spec = tmp_path / "pipe.yaml"
    spec.write_text(json.dumps({"workdir": str(tmp_path), "stages": [{"name": name, **stage}]}))
    return spec


@pytest.mark.parametrize("force", [[], ["--force"]], ids=["plain", "force"])
@pytest.mark.parametrize("dry", [[], ["--dry-run"]], ids=["run", "dry-run"])
def test_run_never_replaces_a_folder_its_stage_did_not_write(force, dry, tiny_llama, tmp_path, capsys, monkeypatch):
    """A stage named like the user's folder holding its own data file: refused, dry run or not, force or not."""
    a = tiny_llama("a")
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    (corpus / "text.txt").write_text("some evaluation text " * 60)
    spec = _pipeline(tmp_path, "corpus", {"stage": "eval", "inputs": [str(a)],
                                          "params": {"data": str(corpus / "text.txt")}})
    before = snapshot(corpus)
    proc = cli(capsys, monkeypatch, "run", spec, "--device", "cpu", "--quiet", *dry, *force)
    refused(proc, "stage 'corpus'", str(corpus))
    assert snapshot(corpus) == before


def test_run_replaces_without_force_only_the_folder_of_the_same_stage(tiny_llama, tmp_path, capsys, monkeypatch):
    a = tiny_llama("a")
    stage = {"stage": "compress", "inputs": [str(a)], "params": {"budget": 0.5}}
    assert cli(capsys, monkeypatch, "run", _pipeline(tmp_path, "scores", stage), "--quiet").returncode == 0
    stage["params"]["budget"] = 0.4  # the same stage, changed: rerun in place
    proc = cli(capsys, monkeypatch, "run", _pipeline(tmp_path, "scores", stage), "--quiet")
    assert proc.returncode == 0, proc.stderr
    assert json.loads((tmp_path / "scores" / ".weightsmith-stage.json").read_text())["params"]["budget"] == 0.4
    (tmp_path / "scores").rename(tmp_path / "other")  # written by weightsmith, for another stage
    before = snapshot(tmp_path / "other")
    for dry in ([], ["--dry-run"]):
        proc = cli(capsys, monkeypatch, "run", _pipeline(tmp_path, "other", stage), "--quiet", *dry)
        refused(proc, "stage 'other'", "not written by this stage", "--force")
    assert snapshot(tmp_path / "other") == before


def test_the_folders_made_for_an_output_go_when_it_is_never_written(tmp_path):
    from weightsmith.checkpoint.writer import release_locks

    out = tmp_path / "runs" / "today" / "out"
    check_output(out)  # a stage checks its output, then stops on an error before writing it
    assert (tmp_path / "runs" / "today" / ".out.weightsmith-lock").is_dir()
    release_locks()
    assert list(tmp_path.iterdir()) == []
    written(out)
    assert (out / "v.txt").read_text() == "ours" and sorted(p.name for p in out.parent.iterdir()) == ["out"]
