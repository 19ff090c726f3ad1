from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from . import app
from .common import ForceOpt, JsonOpt, OutOpt, QuietOpt, ShardOpt, console, print_json, progress_bars


@app.command("export")
def export_cmd(
    model: Annotated[Path, typer.Argument(help="A folder written by fold or compress.")],
    out: OutOpt,
    plain: Annotated[bool, typer.Option("--plain/--no-plain", help="Write an ordinary checkpoint (shared or hashed weights materialised).")] = True,
    out_shard_size: ShardOpt = "5GB",
    force: ForceOpt = False,
    json_out: JsonOpt = False,
    quiet: QuietOpt = False,
) -> None:
    """Turn a folded or RPS folder into a plain checkpoint that stock from_pretrained loads."""
    from ..errors import WeightsmithError
    from ..loading import folder_format, format_module

    fmt = folder_format(model)
    if fmt == "plain":
        raise WeightsmithError(f"{model} is already a plain checkpoint; nothing to export")
    if not plain:
        raise WeightsmithError("only --plain export is available")
    with progress_bars(not quiet) as progress:
        info = format_module(fmt).export_plain(model, out, max_shard_size=out_shard_size, force=force, progress=progress)
    if json_out:
        print_json(info)
    else:
        console.print(f"exported {fmt} folder {model} -> {out}")
