"""Pipeline report: report.json, report.md and a perplexity-vs-size plot in the workdir; eval metrics
copied into the model cards of the stage outputs they measured."""
from __future__ import annotations

import json
from pathlib import Path

from ..checkpoint.card import add_metrics
from ..checkpoint.writer import write_file_atomic
from .spec import Pipeline


def _model_facts(folder: Path) -> dict:
    from ..inspect import summarize
    from ..errors import WeightsmithError

    try:
        info = summarize(folder)
    except WeightsmithError:
        return {}
    return {"size_bytes": info["size_on_disk"], "num_params": info["params"],
            "unique_params": info.get("unique_params", info["params"]), "format": info["format"]}


def _eval_rows(records: list[dict]) -> list[dict]:
    return [dict(row, stage=r["name"]) for r in records for row in (r.get("result") or {}).get("rows", [])]


def _label(model: str, pipeline: Pipeline) -> str:
    p = Path(model)
    return p.name if p.parent == pipeline.workdir else f"{p.name} (input)"


def annotate_cards(pipeline: Pipeline, records: list[dict]) -> None:
    """Put every eval row measured on a stage output into that output's model card."""
    by_model: dict[str, list[dict]] = {}
    for row in _eval_rows(records):
        by_model.setdefault(row["model"], []).append(row)
    for model, rows in by_model.items():
        folder = Path(model)
        if folder.parent == pipeline.workdir and (folder / "README.md").is_file():
            add_metrics(folder, [{"model": folder.name, "data": r.get("data") or r.get("labelled"), "perplexity": r.get("perplexity"),
                                  "accuracy": r.get("accuracy"), "params": r.get("params"),
                                  "size_bytes": r.get("size_bytes")} for r in rows])


def write_report(pipeline: Pipeline, records: list[dict], seconds: float) -> dict:
    from .stages import STAGES

    for r in records:
        if STAGES[r["stage"]].writes_model and r["status"] in ("ran", "skipped"):
            r.update(_model_facts(Path(r["output"])))
    rows = _eval_rows(records)
    for row in rows:
        row["label"] = _label(row["model"], pipeline)
        if "unique_params" not in row:
            row["unique_params"] = _model_facts(Path(row["model"])).get("unique_params")
    files = {"json": str(pipeline.workdir / "report.json"), "markdown": str(pipeline.workdir / "report.md")}
    plot = pipeline.workdir / "perplexity_vs_size.png"
    if any(r.get("perplexity") is not None for r in rows):
        _plot(rows, plot, pipeline.name)
        files["plot"] = str(plot)
    for r in records:  # the analyze stages' similarity heatmaps, linked from the report
        heatmap = Path(r.get("output") or "") / "heatmap.png"
        if r["stage"] == "analyze" and r["status"] in ("ran", "skipped") and heatmap.is_file():
            files[f"heatmap {r['name']}"] = str(heatmap)
    summary = {"pipeline": pipeline.name, "source": str(pipeline.source), "workdir": str(pipeline.workdir),
               "seconds": round(seconds, 3), "status": "failed" if records[-1]["status"] == "failed" else "done",
               "stages": records, "metrics": rows, "files": files}
    pipeline.workdir.mkdir(parents=True, exist_ok=True)
    write_file_atomic(files["json"], json.dumps(summary, indent=2, default=str))
    write_file_atomic(files["markdown"], _markdown(summary))
    return summary


def _num(v, fmt: str = "{:,}") -> str:
    if v is None:
        return ""
    return f"{v:.4g}" if isinstance(v, float) else fmt.format(v)


def _markdown(summary: dict) -> str:
    lines = [f"# Pipeline {summary['pipeline']}", "", f"`{summary['source']}` → `{summary['workdir']}`, "
             f"{summary['seconds']:.1f} s, {summary['status']}.", "",
             "| stage | kind | status | seconds | size (bytes) | params | unique params |", "|---|---|---|---|---|---|---|"]
    for r in summary["stages"]:
        lines.append(f"| {r['name']} | {r['stage']} | {r['status']} | {_num(r.get('seconds'))} | "
                     f"{_num(r.get('size_bytes'))} | {_num(r.get('num_params'))} | {_num(r.get('unique_params'))} |")
    if summary["metrics"]:
        lines += ["", "## Evaluation", "", "| eval stage | model | data | perplexity | accuracy | params | "
                  "unique params | size (bytes) |", "|---|---|---|---|---|---|---|---|"]
        for m in summary["metrics"]:
            lines.append(f"| {m['stage']} | {m['label']} | {m.get('data') or m.get('labelled') or ''} | "
                         f"{_num(m.get('perplexity'))} | {_num(m.get('accuracy'))} | {_num(m.get('params'))} | "
                         f"{_num(m.get('unique_params'))} | {_num(m.get('size_bytes'))} |")
    lines += ["", "## Parameters", ""]
    for r in summary["stages"]:
        lines += [f"- **{r['name']}** ({r['stage']}): `{json.dumps(r['params'], default=str)}`"]
        if r.get("error"):
            lines += [f"  - error: {r['error']}"]
    if "plot" in summary["files"]:
        lines += ["", "![perplexity by model and eval set](perplexity_vs_size.png)"]
    for key, path in summary["files"].items():
        if key.startswith("heatmap "):
            rel = Path(path).relative_to(summary["workdir"]) if path.startswith(summary["workdir"]) else path
            lines += ["", f"![layer similarity of {key[8:]}]({rel})"]
    return "\n".join(lines) + "\n"


def _plot(rows: list[dict], path: Path, title: str) -> None:
    """Perplexity per model as grouped horizontal bars, one bar per eval set, each model labelled with its size:
    readable however many models share one size."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    scored = [r for r in rows if r.get("perplexity") is not None]
    models = list(dict.fromkeys(r["label"] for r in scored))
    sets = sorted({r.get("data") or "perplexity" for r in scored})
    size = {r["label"]: r.get("size_bytes") for r in scored}
    height = 0.8 / len(sets)
    fig, ax = plt.subplots(figsize=(7.5, 1.2 + 0.45 * len(models) * max(1, len(sets) / 2)), dpi=120)
    for k, data in enumerate(sets):
        value = {r["label"]: r["perplexity"] for r in scored if (r.get("data") or "perplexity") == data}
        ys = [i + (k - (len(sets) - 1) / 2) * height for i, m in enumerate(models) if m in value]
        xs = [value[m] for m in models if m in value]
        bars = ax.barh(ys, xs, height=height * 0.95, label=data)
        ax.bar_label(bars, fmt="%.1f", fontsize=6, padding=2)
    ax.set_yticks(range(len(models)),
                  [f"{m} ({size[m] / 1e6:.2f} MB)" if size.get(m) else m for m in models], fontsize=8)
    ax.invert_yaxis()
    ax.set_xlabel("perplexity (lower is better)")
    ax.set_title(f"{title}: perplexity by model and eval set", fontsize=10)
    ax.grid(axis="x", alpha=0.3)
    ax.legend(fontsize=7, loc="lower right")
    fig.tight_layout()
    tmp = path.with_suffix(".tmp.png")
    fig.savefig(tmp)
    plt.close(fig)
    tmp.replace(path)
