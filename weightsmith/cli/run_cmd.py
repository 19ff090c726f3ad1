from __future__ import annotations

import json
import sys
import time
from pathlib import Path
from typing import Annotated

import typer

from . import app
from ..checkpoint.trust import remote_code
from .common import DeviceOpt, QuietOpt, SeedOpt, Table, TrustCodeOpt, console, human_bytes, human_count, progress_bars


@app.command("run")
def run_cmd(
    pipeline: Annotated[Path, typer.Argument(help="Pipeline YAML: a list of stages with inputs and params.")],
    workdir: Annotated[Path | None, typer.Option("--workdir", "-w", help="Folder for stage outputs and the report (default: the YAML's workdir:, else NAME-out beside it).")] = None,
    force: Annotated[bool, typer.Option("--force", help="Rerun every stage, even those whose output is up to date.")] = False,
    dry_run: Annotated[bool, typer.Option("--dry-run", help="Validate the pipeline and show which stages would run.")] = False,
    device: DeviceOpt = "auto",
    seed: SeedOpt = 0,
    json_out: Annotated[bool, typer.Option("--json", help="Print one JSON event per line on stdout (for CI).")] = False,
    quiet: QuietOpt = False,
    trust_remote_code: TrustCodeOpt = False,
) -> None:
    """Run a YAML pipeline of stages; up-to-date stages are skipped; writes report.json, report.md and plots."""
    from ..pipeline import load_pipeline, run_pipeline

    spec = load_pipeline(pipeline, workdir)
    events = _json_events if json_out else _console_events(quiet)
    with remote_code(trust_remote_code), progress_bars(not quiet and not json_out) as progress:
        summary = run_pipeline(spec, device=device, seed=seed, force=force, dry_run=dry_run,
                               progress=progress if not json_out else _json_progress(), events=events)
    if json_out:
        return
    if dry_run:
        table = Table("stage", "kind", "inputs", "status", "checked", title=f"pipeline {spec.name} (dry run)",
                      title_justify="left")
        for r in summary["stages"]:
            table.add_row(r["name"], r["stage"], "\n".join(r["inputs"]), r["status"],
                          "yes" if r.get("checked") else "when its inputs exist")
        console.print(table)
        return
    _print_summary(summary)


def _json_events(event: dict) -> None:
    sys.stdout.write(json.dumps({"time": round(time.time(), 3), **event}, default=str) + "\n")
    sys.stdout.flush()


def _json_progress():
    last: dict[str, int] = {}

    def progress(label: str, done: int, total: int | None) -> None:
        step = max(1, (total or 0) // 10)
        if done in (0, total) or done - last.get(label, 0) >= step:
            last[label] = done
            _json_events({"event": "progress", "label": label, "done": done, "total": total})
    return progress


def _console_events(quiet: bool):
    from .common import err_console, styled

    def events(event: dict) -> None:
        if quiet:
            return
        kind = event["event"]
        if kind == "stage_skipped":
            err_console.print(styled(("skip", "dim"), f" {event['name']} ({event['stage']}): output up to date"))
        elif kind == "stage_done":
            err_console.print(styled(("done", "green"), f" {event['name']} ({event['stage']}) in {event['seconds']:.1f} s"))
        elif kind == "stage_failed":
            err_console.print(styled(("failed", "red"), f" {event['name']} ({event['stage']})"))
    return events


def _print_summary(summary: dict) -> None:
    table = Table("stage", "kind", "status", "seconds", "size", "params", "unique",
                  title=f"pipeline {summary['pipeline']}", title_justify="left")
    for r in summary["stages"]:
        table.add_row(r["name"], r["stage"], r["status"], f"{r['seconds']:.1f}" if r.get("seconds") is not None else "",
                      human_bytes(r["size_bytes"]) if r.get("size_bytes") else "",
                      human_count(r["num_params"]) if r.get("num_params") else "",
                      human_count(r["unique_params"]) if r.get("unique_params") else "")
    console.print(table)
    if summary["metrics"]:
        console.print(_metrics_table(summary["metrics"]))
    console.print("report: " + ", ".join(summary["files"].values()), highlight=False, soft_wrap=True)


def _metrics_table(metrics: list[dict]) -> Table:
    """One row per model, one column per data set (perplexity, or accuracy for labelled data)."""
    columns: list[str] = []
    rows: dict[str, dict] = {}
    for m in metrics:
        col = Path(m.get("data") or m.get("labelled") or m["stage"]).name.split(".")[0]
        if col not in columns:
            columns.append(col)
        row = rows.setdefault(m["label"], {"params": m["params"], "size": m["size_bytes"]})
        value = m.get("perplexity") if m.get("perplexity") is not None else m.get("accuracy")
        row[col] = f"{value:.4f}" if m.get("perplexity") is None and value is not None else \
            (f"{value:.2f}" if value is not None else "")
    table = Table(title="perplexity (accuracy for labelled data)", title_justify="left")
    table.add_column("model")
    for c in (*columns, "params", "size"):
        table.add_column(c, justify="right")
    for label, row in rows.items():
        table.add_row(label, *(row.get(c, "") for c in columns), human_count(row["params"]), human_bytes(row["size"]))
    return table
