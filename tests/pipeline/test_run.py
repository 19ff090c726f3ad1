"""weightsmith run: whole-pipeline validation, wiring of inputs, resume by hash, failure handling, report, cards."""
from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
import yaml

from weightsmith.checkpoint import Checkpoint
from weightsmith.errors import WeightsmithError
from weightsmith.pipeline import STAGES, load_pipeline, run_pipeline

EXAMPLES = sorted((Path(__file__).parents[2] / "examples").glob("*.yaml"))


def write(tmp_path: Path, doc: dict) -> Path:
    path = tmp_path / "pipeline.yaml"
    path.write_text(yaml.safe_dump(doc, sort_keys=False))
    return path


def merge_and_eval(extra_weight: float = 0.5) -> dict:
    return {"name": "t", "workdir": "work", "vars": {"valid": "zoo:data/prose.valid"}, "stages": [
        {"name": "merged", "stage": "merge", "inputs": ["zoo:ft-prose", "zoo:ft-asyncio"],
         "params": {"method": "linear", "parameters": {"weight": extra_weight}}},
        {"name": "look", "stage": "inspect"},
        {"name": "scores", "stage": "eval", "inputs": ["zoo:base", "${stages.merged.output}"],
         "params": {"data": "${vars.valid}", "max_tokens": 300}},
    ]}


@pytest.mark.parametrize("stage, key, message", [
    ({"name": "x", "stage": "melt", "input": "zoo:base"}, "'stage'", "not a stage here"),
    ({"name": "x", "stage": "eval", "input": "zoo:base", "params": {"data": "zoo:data/prose.valid", "speed": 3}},
     "'params.speed'", "no such parameter"),
    ({"name": "x", "stage": "eval", "input": "zoo:base", "params": {"data": "zoo:data/prose.valid",
                                                                     "max_tokens": "many"}},
     "'params.max_tokens'", "is not a"),
    ({"name": "x", "stage": "eval", "input": "zoo:base", "params": {"data": "missing.txt"}}, "'params.data'",
     "not found"),
    ({"name": "x", "stage": "inspect", "input": "no/such/folder"}, "'input'", "not a model folder"),
    ({"name": "x", "stage": "inspect", "input": "${stages.later.output}"}, "'input'", "names no earlier stage"),
    ({"name": "x", "stage": "merge", "inputs": ["zoo:base", "zoo:ft-prose"], "params": {}}, "'params.method'",
     "required"),
])
def test_validation_names_the_stage_and_key_and_runs_nothing(tmp_path, zoo, stage, key, message):
    doc = {"stages": [{"name": "ok", "stage": "inspect", "input": "zoo:base"}, stage]}
    with pytest.raises(WeightsmithError, match=message) as err:
        load_pipeline(write(tmp_path, doc))
    assert "stage 'x'" in str(err.value) and key in str(err.value)
    assert not (tmp_path / "pipeline-out").exists()


def test_run_wires_inputs_reports_metrics_and_resumes(tmp_path, zoo):
    pipeline = load_pipeline(write(tmp_path, merge_and_eval()))
    events: list[dict] = []
    summary = run_pipeline(pipeline, device="cpu", events=events.append)
    work = tmp_path / "work"
    # The merge read both fine-tunes: a linear merge at weight 0.5 is their mean, tensor by tensor.
    out, a, b = Checkpoint(work / "merged"), Checkpoint(zoo.model("ft-prose")), Checkpoint(zoo.model("ft-asyncio"))
    for name in list(out.names())[:5]:
        torch.testing.assert_close(out.get(name).float(), (a.get(name).float() + b.get(name).float()) / 2)
    # inspect read the previous model stage's output by default
    assert json.loads((work / "look" / "inspect.json").read_text())["path"] == str(work / "merged")
    report = json.loads((work / "report.json").read_text())
    ppl = {m["label"]: m["perplexity"] for m in report["metrics"]}
    assert set(ppl) == {"base (input)", "merged"} and all(math.isfinite(v) and v > 1 for v in ppl.values())
    assert (work / "perplexity_vs_size.png").stat().st_size > 1000
    assert "| scores | merged |" in (work / "report.md").read_text()
    card = (work / "merged" / "README.md").read_text()
    assert "## Evaluation" in card and f"{ppl['merged']:.4g}" in card and "weightsmith_recipe.yaml" not in card
    assert [e["event"] for e in events].count("stage_done") == 3
    assert summary["stages"][0]["num_params"] == a.num_params

    stamp = (work / "merged" / ".weightsmith-stage.json").stat().st_mtime_ns
    again: list[dict] = []
    run_pipeline(load_pipeline(write(tmp_path, merge_and_eval())), device="cpu", events=again.append)
    assert [e["event"] for e in again].count("stage_skipped") == 3
    assert (work / "merged" / ".weightsmith-stage.json").stat().st_mtime_ns == stamp

    changed: list[dict] = []  # a new weight reruns the merge and everything reading it
    run_pipeline(load_pipeline(write(tmp_path, merge_and_eval(0.3))), device="cpu", events=changed.append)
    assert [e["name"] for e in changed if e["event"] == "stage_done"] == ["merged", "look", "scores"]
    forced: list[dict] = []
    run_pipeline(load_pipeline(write(tmp_path, merge_and_eval(0.3))), device="cpu", force=True, events=forced.append)
    assert [e["event"] for e in forced].count("stage_done") == 3


def test_a_failed_stage_keeps_earlier_outputs_and_reports_the_failure(tmp_path, zoo):
    doc = {"workdir": "work", "stages": [
        {"name": "merged", "stage": "merge", "inputs": ["zoo:ft-prose", "zoo:ft-asyncio"],
         "params": {"method": "linear"}},
        {"name": "plain", "stage": "export"},  # a plain checkpoint cannot be exported again
    ]}
    with pytest.raises(WeightsmithError, match="stage 'plain' failed.*already a plain checkpoint"):
        run_pipeline(load_pipeline(write(tmp_path, doc)), device="cpu")
    work = tmp_path / "work"
    assert (work / "merged" / ".weightsmith-stage.json").is_file() and Checkpoint(work / "merged").num_params
    assert not (work / "plain").exists()
    report = json.loads((work / "report.json").read_text())
    assert report["status"] == "failed" and report["stages"][-1]["status"] == "failed"


@pytest.mark.slow
@pytest.mark.parametrize("example", EXAMPLES, ids=lambda p: p.stem)
def test_example_pipeline_runs_on_the_tiny_zoo(example, tmp_path, zoo):
    summary = run_pipeline(load_pipeline(example, tmp_path / "work"), device="cpu")
    assert summary["status"] == "done" and summary["metrics"]
    assert all(math.isfinite(m["perplexity"]) for m in summary["metrics"])
    for s in summary["stages"]:
        if STAGES[s["stage"]].writes_model:
            assert (Path(s["output"]) / "README.md").is_file()


def test_examples_validate(zoo):
    assert EXAMPLES
    for example in EXAMPLES:
        assert load_pipeline(example).stages


def test_align_stage_output_computes_the_same_function_as_its_second_input(tmp_path, zoo):
    doc = {"name": "align", "zoo": "tiny", "workdir": "work", "stages": [
        {"name": "aligned", "stage": "align", "inputs": ["zoo:base", "zoo:base-b"], "params": {"method": "weight"}},
        {"name": "scores", "stage": "eval", "inputs": ["zoo:base-b", "${stages.aligned.output}"],
         "params": {"data": "zoo:data/prose.valid", "max_tokens": 300}}]}
    summary = run_pipeline(load_pipeline(write(tmp_path, doc)), device="cpu")
    ppl = [m["perplexity"] for m in summary["metrics"]]
    assert len(ppl) == 2 and ppl[0] == pytest.approx(ppl[1], rel=1e-5)
    moved = Checkpoint(tmp_path / "work" / "aligned").get("model.layers.0.mlp.up_proj.weight")
    assert not torch.equal(moved, Checkpoint(zoo.model("base-b")).get("model.layers.0.mlp.up_proj.weight"))


def test_report_links_the_analyze_heatmap(tmp_path, zoo):
    doc = {"name": "layers", "zoo": "tiny", "workdir": "work", "stages": [
        {"name": "layers", "stage": "analyze", "input": "zoo:base",
         "params": {"data": "zoo:data/general.calib", "max_tokens": 512}}]}
    summary = run_pipeline(load_pipeline(write(tmp_path, doc)), device="cpu")
    heatmap = Path(summary["files"]["heatmap layers"])
    assert heatmap.is_file() and heatmap.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "![layer similarity of layers](layers/heatmap.png)" in (tmp_path / "work" / "report.md").read_text()
