from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from . import app
from .common import JsonOpt, OfflineOpt, PickleOpt, Table, console, go_offline, human_bytes, human_count, model_folder, print_json


@app.command("inspect")
def inspect_cmd(
    model: Annotated[Path, typer.Argument(help="Model folder (config.json + safetensors).")],
    tensors: Annotated[bool, typer.Option("--tensors", help="Also list every tensor.")] = False,
    json_out: JsonOpt = False,
    allow_pickle: PickleOpt = False,
    offline: OfflineOpt = False,
) -> None:
    """Architecture, layers, parameters, dtypes, size and shards of a model folder, from headers alone."""
    from ..inspect import summarize

    go_offline(offline)
    model = model_folder(model, allow_pickle=allow_pickle)
    info = summarize(model, allow_pickle=allow_pickle, tensors=tensors)
    if json_out:
        print_json(info)
        return
    table = Table(show_header=False)
    table.add_column(style="bold")
    table.add_column()
    table.add_row("path", info["path"])
    table.add_row("architecture", str(info["architecture"]))
    table.add_row("format", info["format"])
    table.add_row("layers", f"{info['layers']} under {info['layout'].get('block_prefix')}" if info["layers"] else
                  info["layout"].get("error", "?"))
    table.add_row("parameters", f"{human_count(info['params'])} ({info['params']:,})")
    if "unique_params" in info:
        table.add_row("unique / total", f"{info['unique_params']:,} / {info['total_params']:,}")
    table.add_row("dtypes", ", ".join(f"{k}: {human_count(v)}" for k, v in info["dtypes"].items()))
    table.add_row("size on disk", human_bytes(info["size_on_disk"]))
    table.add_row("shards", f"{len(info['shards'])}: {', '.join(info['shards'][:3])}{' …' if len(info['shards']) > 3 else ''}")
    console.print(table)
    if tensors:
        t = Table("tensor", "shape", "dtype", "file")
        for row in info["tensors"]:
            t.add_row(row["name"], str(row["shape"]), row["dtype"], row["file"])
        console.print(t)
