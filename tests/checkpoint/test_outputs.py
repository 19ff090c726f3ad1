"""Outputs that cannot be lost: refusals, the lock, atomic replace, recovery after a kill, write errors.

Through the command line wherever a user meets the case: exit status 2, one line on stderr, no traceback,
inputs byte-identical, nothing written outside the output.
"""
from __future__ import annotations

import errno
import os
import shutil
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from cli_check import cli, refused, snapshot
from weightsmith.checkpoint import writer
from weightsmith.checkpoint.writer import MARKER, ShardedWriter, check_output, output_folder
from weightsmith.errors import WeightsmithError


@pytest.fixture
def pair(tiny_llama, tmp_path):
    a, b = tiny_llama("a", seed=0), tiny_llama("b", seed=1)
    return a, b


def merge_args(a: Path, b: Path, out) -> list:
    return ["merge", "--method", "linear", "--model", a, "--model", b, "-o", out, "-q", "--device", "cpu"]


def dead_pid() -> int:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


# -- refusals --------------------------------------------------------------------------------------

def test_analyze_refuses_an_output_in_its_input_and_an_existing_one_without_force(tiny_llama, tmp_path):
    model = tiny_llama("m")
    data = tmp_path / "calib.txt"
    data.write_text("some text " * 50)
    (tmp_path / "done").mkdir()
    (tmp_path / "done" / "keep.txt").write_text("mine")
    before = snapshot(tmp_path)
    refused(cli("analyze", model, "--data", data, "-o", model), "inside input")
    refused(cli("analyze", model, "--data", data, "-o", model / "report"), "inside input")
    refused(cli("analyze", model, "--data", data, "-o", tmp_path / "done"), "already exists", "--force")
    assert snapshot(tmp_path) == before


def test_links_files_and_unwritable_parents_are_refused_before_any_work(pair, tmp_path):
    a, b = pair
    (tmp_path / "dangling").symlink_to(tmp_path / "nowhere")
    (tmp_path / "file").write_text("x")
    before = snapshot(tmp_path)
    refused(cli(*merge_args(a, b, tmp_path / "dangling")), "symbolic link")
    refused(cli(*merge_args(a, b, tmp_path / "file")), "not a folder")
    refused(cli(*merge_args(a, b, tmp_path / "file" / "sub" / "out")), "file is not a folder")
    assert snapshot(tmp_path) == before


def _namespace_ok() -> bool:
    try:
        return subprocess.run(["unshare", "-rm", "true"], capture_output=True, timeout=30).returncode == 0
    except (OSError, subprocess.TimeoutExpired):
        return False


@pytest.mark.skipif(not _namespace_ok(), reason="needs `unshare -rm` to mount a private tmpfs")
@pytest.mark.parametrize("options, words", [("ro,size=1m", ("Read-only file system",)),
                                            ("size=8k", ("needs", "free"))])
def test_read_only_and_full_disks_are_one_line_before_the_merge_runs(pair, tmp_path, options, words):
    """A private tmpfs (user + mount namespace): read-only, or too small for the output."""
    a, b = pair
    disk = tmp_path / "disk"
    disk.mkdir()
    before = snapshot(tmp_path)
    cmd = " ".join(str(x) for x in [sys.executable, "-m", "weightsmith", *merge_args(a, b, disk / "out")])
    proc = subprocess.run(["unshare", "-rm", "sh", "-c", f"mount -t tmpfs -o {options} tmpfs {disk} && {cmd}; "
                           f"code=$?; ls -A {disk}; exit $code"], capture_output=True, text=True, timeout=300)
    refused(proc, *words)
    assert proc.stdout.strip() == ""  # nothing left on that disk
    assert snapshot(tmp_path) == before


def test_a_write_error_while_writing_is_one_line_and_leaves_nothing(tmp_path, monkeypatch):
    def full(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    with pytest.raises(WeightsmithError, match="No space left on device; free space") as err:
        with output_folder(tmp_path / "out") as tmp:
            (tmp / "a.txt").write_text("partial")
            full()
    assert "\n" not in str(err.value)
    assert sorted(p.name for p in tmp_path.iterdir()) == []


def test_the_sharded_writer_checks_free_space_before_writing(tmp_path, monkeypatch):
    import torch

    monkeypatch.setattr(writer.shutil, "disk_usage", lambda p: shutil._ntuple_diskusage(10**9, 10**9 - 100, 100))
    (tmp_path / "x.tmp-1-00000000").mkdir()
    with pytest.raises(WeightsmithError, match=r"x: it needs 4.0 KB but the disk has 100 bytes free"):
        ShardedWriter(tmp_path / "x.tmp-1-00000000", [("w", torch.float32, (1000,))])
    assert list((tmp_path / "x.tmp-1-00000000").iterdir()) == []


# -- the lock, concurrent runs and the replace -----------------------------------------------------

HOLD = textwrap.dedent("""
    import sys, time
    from weightsmith.checkpoint.writer import output_folder
    with output_folder(sys.argv[1], force=True) as tmp:
        (tmp / "config.json").write_text("{}")
        print("holding", flush=True)
        time.sleep(120)
""")


def test_a_second_run_to_the_same_output_fails_at_once_and_a_killed_runs_leftovers_are_cleaned(pair, tmp_path):
    a, b = pair
    out = tmp_path / "out"
    holder = subprocess.Popen([sys.executable, "-c", HOLD, str(out)], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "holding"
        line = refused(cli(*merge_args(a, b, out) + ["--force"]), "being written by another weightsmith run",
                       f"pid {holder.pid}")
        assert str(out) in line
    finally:
        holder.send_signal(signal.SIGKILL)
        holder.wait()
    stale = [p.name for p in tmp_path.iterdir() if p.name.startswith("out.tmp-")]
    assert stale == [next(n for n in stale if n.startswith(f"out.tmp-{holder.pid}-"))]  # kill -9 left its temp
    proc = cli(*merge_args(a, b, out))
    assert proc.returncode == 0, proc.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a", "b", "out"]  # temp of the dead run gone, no lock
    assert (out / "model.safetensors").is_file()


def test_the_lock_is_held_from_the_first_check_until_the_output_is_in_place(tmp_path):
    out = tmp_path / "out"
    check_output(out)  # a stage checks early, computes, then writes
    probe = subprocess.run([sys.executable, "-c", "import sys\nfrom weightsmith.checkpoint import check_output\n"
                            "check_output(sys.argv[1])", str(out)], capture_output=True, text=True, timeout=120)
    assert probe.returncode != 0 and "being written by another weightsmith run" in probe.stderr
    with output_folder(out) as tmp:
        (tmp / "f").write_text("1")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]  # lock file removed with the lock


def test_an_output_that_appears_meanwhile_is_never_deleted(tmp_path):
    out = tmp_path / "out"
    with pytest.raises(WeightsmithError, match="appeared while this run was writing it") as err:
        with output_folder(out) as tmp:
            (tmp / "result.txt").write_text("ours")
            out.mkdir()
            (out / "theirs.txt").write_text("theirs")
    assert (out / "theirs.txt").read_text() == "theirs"
    kept = Path(str(err.value).split("the result is in ")[1].split(" ")[0])
    assert (kept / "result.txt").read_text() == "ours"


@pytest.mark.parametrize("exchange", [True, False], ids=["rename-exchange", "journalled"])
def test_force_replaces_atomically_and_leaves_nothing_beside(tmp_path, monkeypatch, exchange):
    if not exchange:
        monkeypatch.setattr(writer, "_renameat2", lambda *a: False)
    out = tmp_path / "out"
    for content in ("old", "new"):
        with output_folder(out, force=True) as tmp:
            (tmp / "v.txt").write_text(content)
    assert (out / "v.txt").read_text() == "new"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]


@pytest.mark.parametrize("renamed_old", [False, True], ids=["killed-before-renames", "killed-between-renames"])
def test_a_replace_killed_half_way_is_finished_by_the_next_run(tmp_path, renamed_old):
    """The journalled replace: a kill before or between its two renames; OUT is never lost."""
    out, pid = tmp_path / "out", dead_pid()
    new, old = tmp_path / f"out.tmp-{pid}-0000000a", tmp_path / f"out.old-{pid}-0000000b"
    for folder, content in ((out, "old"), (new, "new")):
        folder.mkdir()
        (folder / "v.txt").write_text(content)
        (folder / MARKER).write_text("weightsmith\n")
    (tmp_path / ".out.weightsmith-lock").mkdir(mode=0o700)
    (tmp_path / ".out.weightsmith-lock" / "replace.json").write_text(f'{{"new": "{new.name}", "old": "{old.name}"}}')
    if renamed_old:
        out.rename(old)
    with pytest.raises(WeightsmithError, match="already exists"):
        check_output(out)  # recovery first: the user's finished result is OUT again, nothing else is left
    assert (out / "v.txt").read_text() == "new"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]


def test_only_temp_folders_of_dead_runs_are_removed(tmp_path):
    live = tmp_path / f"out.tmp-{os.getppid()}-0000000c"
    dead = tmp_path / f"out.tmp-{dead_pid()}-0000000d"
    other = tmp_path / "other.tmp-1-0000000e"
    for p in (live, dead, other):
        p.mkdir()
    with output_folder(tmp_path / "out") as tmp:
        (tmp / "f").write_text("1")
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(["out", live.name, other.name])
