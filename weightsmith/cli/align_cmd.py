from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from ..stage_options import AlignOptions, PleasOptions
from ..checkpoint.trust import remote_code
from . import app
from .common import model_folder, OutOpt, RunFlags, console, print_json, progress_bars
from .options import with_options


@app.command("align")
@with_options(RunFlags, "run", only=("seed", "device", "force", "json_out", "quiet", "trust_remote_code", "offline"))
@with_options(AlignOptions)
def align_cmd(
    model_a: Annotated[Path, typer.Argument(help="Reference model folder (its basis is kept).")],
    model_b: Annotated[Path, typer.Argument(help="Model folder to permute into A's basis.")],
    out: OutOpt,
    opts: AlignOptions,
    run: RunFlags = None,
) -> None:
    """Permute B's units (residual stream, heads, MLP units) into A's basis; OUT computes the same function as B."""
    from ..merge.align.folders import align

    with remote_code(run.trust_remote_code), progress_bars(not run.quiet) as progress:
        model_a, model_b = model_folder(model_a, run), model_folder(model_b, run)
        report = align(model_a, model_b, out, opts, seed=run.seed, device=run.device, force=run.force,
                       progress=progress)
    if run.json_out:
        print_json(report)
    else:
        console.print(f"aligned {model_b} onto {model_a} ({report['method']} matching): {report['units_moved']} of "
                      f"{report['units']} units in {report['groups']} groups moved, {report['matching_s']:.1f} s -> {out}")


@app.command("pleas")
@with_options(RunFlags, "run", only=("seed", "device", "force", "json_out", "quiet", "trust_remote_code", "offline"))
@with_options(PleasOptions)
def pleas_cmd(
    model_a: Annotated[Path, typer.Argument(help="First model folder (Llama/Mistral/Qwen2).")],
    model_b: Annotated[Path, typer.Argument(help="Second model folder, same architecture, any base.")],
    out: OutOpt,
    opts: PleasOptions,
    run: RunFlags = None,
) -> None:
    """PLeaS: merge two models (possibly from different bases) into one of --width× size."""
    from ..merge.pleas_stage import pleas_merge

    with remote_code(run.trust_remote_code), progress_bars(not run.quiet) as progress:
        model_a, model_b = model_folder(model_a, run), model_folder(model_b, run)
        report = pleas_merge(model_a, model_b, opts, out=out, seed=run.seed, device=run.device, force=run.force,
                             progress=progress)
    if run.json_out:
        print_json(report)
    else:
        console.print(f"PLeaS {report['width']}x: intermediate_size {report['intermediate_size']}, "
                      f"{report['params']:,} params ({report['size_vs_a']}x A) -> {out}")
