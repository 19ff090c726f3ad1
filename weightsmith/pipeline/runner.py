"""Run a validated pipeline: skip stages whose output already matches, run the rest in order, report.

A stage's key hashes its kind, parameters, seed and inputs (an upstream stage's key, or the names, sizes
and mtimes of an outside folder's files), so a change anywhere upstream reruns everything below it.
"""
from __future__ import annotations

import hashlib
import json
import time
from collections.abc import Callable
from pathlib import Path

import yaml

from .. import __version__
from ..checkpoint import output_folder
from ..checkpoint.writer import check_replaceable
from ..errors import WeightsmithError, needs_option, reworded
from ..progress import ProgressFn, report
from .spec import Pipeline, StageEntry
from .stages import STAGES, Context

STAMP = ".weightsmith-stage.json"
EventFn = Callable[[dict], None]


def fingerprint(path: Path) -> list:
    """Cheap identity of an outside file or folder: relative names, sizes and modification times."""
    files = [path] if path.is_file() else sorted(p for p in path.rglob("*") if p.is_file() and p.name != STAMP)
    return [[str(p.relative_to(path)) if p != path else p.name, p.stat().st_size, p.stat().st_mtime_ns] for p in files]


def stage_key(entry: StageEntry, keys: dict[str, str], outputs: dict[Path, str], seed: int) -> str:
    def ident(value):
        if isinstance(value, str) and Path(value) in outputs:
            return {"stage": keys[outputs[Path(value)]]}
        if isinstance(value, str) and Path(value).is_absolute() and Path(value).exists():
            return {"path": value, "files": fingerprint(Path(value))}
        if isinstance(value, list):
            return [ident(v) for v in value]
        if isinstance(value, dict):
            return {k: ident(v) for k, v in value.items()}
        return value

    blob = {"weightsmith": __version__, "stage": entry.stage, "seed": seed, "inputs": ident(entry.inputs),
            "params": ident(entry.params)}
    return hashlib.sha256(json.dumps(blob, sort_keys=True, default=str).encode()).hexdigest()[:16]


def read_stamp(folder: Path) -> dict | None:
    try:
        return json.loads((folder / STAMP).read_text())
    except (OSError, json.JSONDecodeError):
        return None


def run_pipeline(pipeline: Pipeline, *, device: str = "auto", seed: int = 0, force: bool = False,
                 dry_run: bool = False, progress: ProgressFn | None = None, events: EventFn | None = None) -> dict:
    """Run every stage whose output is missing or stale; return the report (also written to the workdir)."""
    emit = events or (lambda e: None)
    keys: dict[str, str] = {}
    records: list[dict] = []
    emit({"event": "pipeline_start", "pipeline": pipeline.name, "workdir": str(pipeline.workdir),
          "stages": [s.name for s in pipeline.stages], "dry_run": dry_run})
    start = time.perf_counter()
    failed: WeightsmithError | None = None
    plans = _check_all(pipeline, keys, device=device, seed=seed, force=force)
    for i, (entry, out, stamp, record) in enumerate(plans):
        report(progress, f"pipeline {pipeline.name}", i, len(pipeline.stages))
        if dry_run:
            record["status"] = "up to date" if stamp is not None else "would run"
            emit({"event": "stage_plan", **record})
            records.append(record)
            continue
        del record["checked"]
        if stamp is not None:
            record.update(status="skipped", seconds=stamp.get("seconds"), result=stamp.get("result", {}))
            emit({"event": "stage_skipped", "name": entry.name, "stage": entry.stage, "output": str(out)})
        else:
            emit({"event": "stage_start", "name": entry.name, "stage": entry.stage, "inputs": entry.inputs,
                  "output": str(out)})
            t0 = time.perf_counter()
            try:
                result = _run_stage(pipeline, entry, out, keys[entry.name], device, seed, progress)
            except WeightsmithError as exc:
                record.update(status="failed", seconds=round(time.perf_counter() - t0, 3), error=str(exc))
                emit({"event": "stage_failed", "name": entry.name, "stage": entry.stage, "error": str(exc)})
                records.append(record)
                failed = exc
                break
            record.update(status="ran", seconds=round(time.perf_counter() - t0, 3), result=result)
            emit({"event": "stage_done", "name": entry.name, "stage": entry.stage, "seconds": record["seconds"],
                  "output": str(out)})
        records.append(record)
    report(progress, f"pipeline {pipeline.name}", len(records), len(pipeline.stages))
    return _finish(pipeline, records, failed, dry_run=dry_run, seconds=time.perf_counter() - start, emit=emit)


def _check_all(pipeline: Pipeline, keys: dict[str, str], *, device: str, seed: int,
               force: bool) -> list[tuple[StageEntry, Path, dict | None, dict]]:
    """The checks, for a dry run and a real one alike: a stage whose inputs exist is run up to its output check,
    so a bad parameter or input folder is refused before any stage computes. Returns each stage's entry, output,
    stamp (None: it runs) and report record; fills ``keys``."""
    outputs = {pipeline.output(s.name): s.name for s in pipeline.stages}
    plans: list[tuple[StageEntry, Path, dict | None, dict]] = []
    pending: set[Path] = set()  # outputs to be (re)written: the stages reading them are checked when they run
    for entry in pipeline.stages:
        keys[entry.name] = stage_key(entry, keys, outputs, seed)
        out = pipeline.output(entry.name)
        stamp = read_stamp(out) if out.is_dir() else None
        fresh = stamp is not None and stamp.get("key") == keys[entry.name] and stamp.get("status") == "done"
        record = {"name": entry.name, "stage": entry.stage, "inputs": entry.inputs, "output": str(out),
                  "params": entry.params, "key": keys[entry.name]}
        _check_replace(entry, out, stamp, force)
        if not fresh or force:
            pending.add(out)
        record["checked"] = _dry_check(pipeline, entry, out, pending, device, seed)
        plans.append((entry, out, stamp if fresh and not force else None, record))
    return plans


def _check_replace(entry: StageEntry, out: Path, stamp: dict | None, force: bool) -> None:
    """A stage replaces an existing output folder only when weightsmith wrote it, and, without force, only when
    this stage did (its stamp names it): a stage named like a folder of the user's never deletes that folder."""
    if not (out.exists() or out.is_symlink()):
        return
    try:
        check_replaceable(out)
        if out.is_symlink() or not out.is_dir():
            raise WeightsmithError(f"{out} is not a folder weightsmith wrote; remove it or rename the stage")
    except WeightsmithError as exc:
        raise reworded(exc, prefix=f"{entry.where()}: ") from None
    if not force and (stamp is None or stamp.get("name") != entry.name or stamp.get("stage") != entry.stage):
        raise needs_option(f"{entry.where()}: {out} already exists and was not written by this stage",
                           "; {0} replaces it", "force")


def _finish(pipeline: Pipeline, records: list[dict], failed: WeightsmithError | None, *, dry_run: bool,
            seconds: float, emit: EventFn) -> dict:
    """The summary (and, after a real run, the report and the cards' evaluation); a failure is raised here."""
    if dry_run:
        summary = {"pipeline": pipeline.name, "workdir": str(pipeline.workdir), "dry_run": True, "stages": records}
        emit({"event": "pipeline_done", "dry_run": True})
        return summary
    from .report import annotate_cards, write_report

    annotate_cards(pipeline, records)
    summary = write_report(pipeline, records, seconds=seconds)
    emit({"event": "pipeline_failed" if failed else "pipeline_done", "report": summary["files"]})
    if failed is not None:
        raise reworded(failed, prefix=f"stage {records[-1]['name']!r} failed: ",
                       suffix=f" (earlier outputs kept in {pipeline.workdir}; rerun to resume)")
    return summary


def _dry_check(pipeline: Pipeline, entry: StageEntry, out: Path, pending: set[Path], device: str,
               seed: int) -> bool:
    """The checks a real run makes before its stage computes: every input folder validated as ``inspect`` does,
    then the stage itself run up to its output check. False when an input is yet to be written by an earlier
    stage (a real run checks it then)."""
    from ..checkpoint import Checkpoint
    from ..checkpoint.writer import ChecksPassed, validate_only

    spec = STAGES[entry.stage]
    named = [Path(p) for p in entry.inputs] + [Path(v) for k in spec.paths for v in _as_list(entry.params.get(k))]
    if any(p in pending and p != out for p in named):
        return False
    for p in entry.inputs:
        if Path(p) not in pending:
            try:
                Checkpoint(Path(p))
            except WeightsmithError as exc:
                raise reworded(exc, prefix=f"{entry.where('inputs')}: ") from None
    _check_data(entry)
    if not spec.validates_dry:
        return True
    ctx = Context(inputs=[Path(p) for p in entry.inputs], out=out, device=device, seed=seed, force=out.exists(),
                  dry_run=True)
    try:
        with validate_only():
            spec.fn(ctx, **entry.params)
    except ChecksPassed:
        return True
    except WeightsmithError as exc:
        raise reworded(exc, prefix=f"{entry.where()}: ") from None
    raise WeightsmithError(f"{entry.where()}: stage {entry.stage!r} cannot be checked without running it")


def _check_data(entry: StageEntry) -> None:
    """The stage's data files read as the stage will read them (up to its token budget): a file the stage would
    refuse after computing for a while is refused before any stage computes."""
    from ..data import check_data_file

    options = STAGES[entry.stage].options
    budget = entry.params.get("max_tokens", options.default("max_tokens") if options is not None and
                              "max_tokens" in options.specs() else None)
    for key, labelled in (("data", False), ("labelled", True)):
        if isinstance(entry.params.get(key), (str, Path)):
            try:
                check_data_file(entry.params[key], labelled=labelled, max_tokens=budget)
            except WeightsmithError as exc:
                raise reworded(exc, prefix=f"{entry.where('params.' + key)}: ") from None


def _as_list(value) -> list:
    return [] if value is None else value if isinstance(value, list) else [value]


def _run_stage(pipeline: Pipeline, entry: StageEntry, out: Path, key: str, device: str, seed: int,
               progress: ProgressFn | None) -> dict:
    spec = STAGES[entry.stage]
    recipe = yaml.safe_dump({k: v for k, v in entry.raw.items()}, sort_keys=False)
    pipeline.workdir.mkdir(parents=True, exist_ok=True)
    inputs = [Path(p) for p in entry.inputs]
    t0 = time.perf_counter()
    if spec.writes_model:
        ctx = Context(inputs=inputs, out=out, device=device, seed=seed, force=out.exists(), progress=progress,
                      recipe=recipe)
        result = spec.fn(ctx, **entry.params) or {}
        if not (out / "config.json").is_file():
            raise WeightsmithError(f"stage {entry.name!r} wrote no model folder at {out}")
        _ensure_card(out, entry, recipe)
    else:
        with output_folder(out, inputs=[], force=True) as tmp:
            ctx = Context(inputs=inputs, out=tmp, device=device, seed=seed, force=True, progress=progress,
                          recipe=recipe)
            result = spec.fn(ctx, **entry.params) or {}
            _write_stamp(tmp, entry, key, result, time.perf_counter() - t0)
        return result
    _write_stamp(out, entry, key, result, time.perf_counter() - t0)
    return result


def _write_stamp(folder: Path, entry: StageEntry, key: str, result: dict, seconds: float) -> None:
    (folder / STAMP).write_text(json.dumps({"key": key, "status": "done", "seconds": round(seconds, 3),
                                            "name": entry.name, "stage": entry.stage,
                                            "inputs": entry.inputs, "params": entry.params, "result": result},
                                           indent=2, default=str))


def _ensure_card(out: Path, entry: StageEntry, recipe: str) -> None:
    from ..checkpoint.card import write_model_card

    if not (out / "README.md").is_file():
        write_model_card(out, stage=entry.stage, method=str(entry.params.get("method", entry.stage)),
                         inputs=entry.inputs, parameters=entry.params, recipe=recipe)
