"""run --dry-run makes the checks a real run makes before computing; a workdir inside an input is refused.

Through the command line: exit 2, one line, no traceback, nothing written (not even the workdir).
"""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

from cli_check import cli, refused, snapshot


@pytest.fixture
def models(tiny_llama, tmp_path):
    base, ft = tiny_llama("base", seed=0), tiny_llama("ft", seed=1)
    corrupt = tiny_llama("corrupt", seed=2)
    blob = (corrupt / "model.safetensors").read_bytes()
    (corrupt / "model.safetensors").write_bytes(blob[: len(blob) // 2])
    return tmp_path


def pipeline(tmp_path: Path, *stages: dict) -> Path:
    path = tmp_path / "p.yaml"
    path.write_text(yaml.safe_dump({"workdir": "work", "stages": list(stages)}, sort_keys=False))
    return path


MERGE = {"name": "merged", "stage": "merge", "inputs": ["base", "ft"], "params": {"method": "linear"}}


@pytest.mark.parametrize("stage, words", [
    ({"name": "ties", "stage": "merge", "inputs": ["base", "ft"],
      "params": {"method": "ties", "base_model": "base", "parameters": {"density": 2.0}}},
     ("stage 'ties'", "density", "2.0")),
    ({"name": "rps", "stage": "compress", "input": "base", "params": {"budget": -0.5}}, ("stage 'rps'", "budget")),
    ({"name": "look", "stage": "inspect", "input": "corrupt"}, ("stage 'look'", "corrupt")),
    ({"name": "m2", "stage": "merge", "inputs": ["base", "corrupt"], "params": {"method": "linear"}},
     ("stage 'm2'", "corrupt")),
    ({"name": "sim", "stage": "analyze", "input": "base", "params": {"data": "p.yaml", "remove": 1.5}},
     ("stage 'sim'", "key 'params.remove': 1.5")),
])
def test_dry_run_refuses_what_the_run_refuses(models, stage, words):
    path = pipeline(models, MERGE, stage)
    before = snapshot(models)
    refused(cli("run", path, "--dry-run"), *words)
    refused(cli("run", path), *words)  # the real run refuses the same pipeline before computing anything
    assert snapshot(models) == before


def test_a_valid_dry_run_checks_what_exists_and_writes_nothing(models):
    path = pipeline(models, MERGE, {"name": "look", "stage": "inspect"},
                    {"name": "sim", "stage": "analyze", "input": "base", "params": {"data": "p.yaml"}})
    before = snapshot(models)
    proc = cli("run", path, "--dry-run", "--json")
    assert proc.returncode == 0, proc.stderr
    plans = {e["name"]: e for e in map(json.loads, proc.stdout.splitlines()) if e["event"] == "stage_plan"}
    assert plans["merged"]["checked"] and plans["sim"]["checked"]
    assert not plans["look"]["checked"]  # reads the merge's output, which a real run writes first
    assert snapshot(models) == before


@pytest.mark.parametrize("workdir", ["base", "base/work"])
def test_a_workdir_inside_an_input_is_refused(models, workdir):
    path = pipeline(models, MERGE)
    before = snapshot(models)
    for extra in (["--dry-run"], []):
        refused(cli("run", path, "--workdir", models / workdir, *extra), "workdir", "lies inside", "base")
    assert snapshot(models) == before
