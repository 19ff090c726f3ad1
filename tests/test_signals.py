"""Exit codes tell the truth: SIGINT exits 130 and SIGTERM 143, with one line on stderr, no temp folder and no
lock left, whichever stage was running. Real processes running the console entry point; the stage is slowed
(each written tensor, or the model load) so that the signal lands while it works."""
from __future__ import annotations

import json
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

# The command line with one library step (MODULE:NAME, run in the main thread) made slow; prints "slow" once
# the step is reached.
CHILD = textwrap.dedent("""
    import importlib, sys, time
    from weightsmith.cli import main

    module, _, name = sys.argv[1].partition(":")
    owner = importlib.import_module(module)
    *path, name = name.split(".")
    for part in path:
        owner = getattr(owner, part)
    step = getattr(owner, name)

    def slow(*args, **kwargs):
        print("slow", flush=True)
        time.sleep(60)
        return step(*args, **kwargs)

    setattr(owner, name, slow)
    sys.argv = ["weightsmith", *sys.argv[2:]]
    main()
""")
MERGE_SIDE_FILES = "weightsmith.merge.stage:copy_side_files"  # inside the output folder, after the tensors
WRITE = "weightsmith.checkpoint.writer:ShardedWriter.write"
PROJECT = "weightsmith.compressor.rps:project_checkpoint"  # after the output is checked and locked, before its folder exists


@pytest.fixture(scope="module")
def pair(tmp_path_factory):
    from weightsmith.zoo.synthetic import random_llama

    from weightsmith.compressor.rps import compress_rps

    root = tmp_path_factory.mktemp("signals")
    a, b = random_llama(root / "a"), random_llama(root / "b", seed=1)
    compress_rps(a, root / "rps", budget=0.5, device="cpu")
    return a, b


def _args(kind: str, a: Path, b: Path, tmp_path: Path) -> list:
    out = tmp_path / "out"
    if kind == "merge":
        return [MERGE_SIDE_FILES, "merge", "--method", "linear", "--model", a, "--model", b, "-o", out, "--quiet"]
    if kind == "compress-while-projecting":
        return [PROJECT, "compress", "rps", a, "-o", out, "--budget", "0.5", "--device", "cpu", "--quiet"]
    if kind == "export-while-writing":
        return [WRITE, "export", a.parent / "rps", "-o", out, "--quiet"]
    spec = tmp_path / "pipe.yaml"
    spec.write_text(json.dumps({"workdir": str(out), "stages": [
        {"name": "soup", "stage": "merge", "inputs": [str(a), str(b)], "params": {"method": "linear"}}]}))
    return [MERGE_SIDE_FILES, "run", spec, "--quiet"]


CASES = [("merge", signal.SIGINT, 130), ("compress-while-projecting", signal.SIGTERM, 143),
         ("export-while-writing", signal.SIGINT, 130), ("run", signal.SIGTERM, 143)]


@pytest.mark.parametrize("kind, sig, code", CASES, ids=[f"{k}-{s.name}" for k, s, _ in CASES])
def test_a_signal_during_a_stage_exits_128_plus_its_number_and_leaves_nothing(kind, sig, code, pair, tmp_path):
    a, b = pair
    proc = subprocess.Popen([sys.executable, "-c", CHILD, *map(str, _args(kind, a, b, tmp_path))],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        assert proc.stdout.readline().strip() == "slow", proc.stderr.read()
        proc.send_signal(sig)
        err = proc.communicate(timeout=60)[1]
    finally:
        proc.kill()
    lines = [ln for ln in err.splitlines() if ln.strip()]
    assert proc.returncode == code, err
    assert len(lines) == 1 and lines[0].startswith("error:") and signal.Signals(sig).name in lines[0], err
    left = [p.name for p in tmp_path.rglob("*") if ".tmp-" in p.name or "weightsmith-lock" in p.name]
    assert left == [] and not (tmp_path / "out" / "soup").exists() and not (tmp_path / "out" / "config.json").exists()


@pytest.mark.slow
def test_a_second_signal_does_not_interrupt_the_clean_up(pair, tmp_path):
    a, b = pair
    proc = subprocess.Popen([sys.executable, "-c", CHILD, *map(str, _args("merge", a, b, tmp_path))],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        assert proc.stdout.readline().strip() == "slow"
        proc.send_signal(signal.SIGTERM)
        time.sleep(0.05)
        proc.send_signal(signal.SIGINT)
        err = proc.communicate(timeout=60)[1]
    finally:
        proc.kill()
    assert proc.returncode == 143, err
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(("out.tmp-", ".out.weightsmith-lock"))]
