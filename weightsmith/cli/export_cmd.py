from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from ..stage_options import ExportOptions
from . import app
from .common import OfflineOpt, go_offline, model_folder, ForceOpt, JsonOpt, OutOpt, QuietOpt, console, print_json, progress_bars
from .options import with_options


@app.command("export")
@with_options(ExportOptions)
def export_cmd(
    model: Annotated[Path, typer.Argument(help="A folder written by fold or compress.")],
    out: OutOpt,
    opts: ExportOptions,
    force: ForceOpt = False,
    json_out: JsonOpt = False,
    quiet: QuietOpt = False,
    offline: OfflineOpt = False,
) -> None:
    """Turn a folded or RPS folder into a plain checkpoint that stock from_pretrained loads."""
    from ..export import export

    go_offline(offline)
    model = model_folder(model)
    with progress_bars(not quiet) as progress:
        info = export(model, out, opts, force=force, progress=progress)
    if json_out:
        print_json(info)
    else:
        console.print(f"exported {info['format']} folder {model} -> {out}")
