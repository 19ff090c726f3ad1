from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from ..stage_options import RpsOptions
from ..checkpoint.trust import remote_code
from . import app
from .common import OutOpt, RunFlags, Table, console, human_bytes, human_count, model_folder, print_json, progress_bars
from .options import with_options

compress_app = typer.Typer(help="Compress a checkpoint under a parameter budget.", no_args_is_help=True)
app.add_typer(compress_app, name="compress")


@compress_app.command("rps")
@with_options(RunFlags, "run", only=("device", "seed", "force", "json_out", "quiet", "trust_remote_code", "offline"))
@with_options(RpsOptions)
def rps_cmd(
    model: Annotated[Path | None, typer.Argument(help="Trained model folder to project into hashed memory.")] = None,
    out: OutOpt = ...,
    opts: RpsOptions = None,
    run: RunFlags = None,
) -> None:
    """Randomized parameter sharing (ROAST / STABLE-RPS): every compressed weight is read from one hashed memory."""
    from ..compressor.rps import compress_rps, train_rps
    from ..errors import WeightsmithError

    if (model is None) == (opts.from_config is None):
        raise WeightsmithError("give either MODEL (project a trained model) or --from-config CONFIG (train from scratch)")
    if opts.from_config is not None and not opts.train:
        raise WeightsmithError("--from-config builds an untrained model; add --train --data TEXT")
    with remote_code(run.trust_remote_code), progress_bars(not run.quiet) as progress:
        common = {"device": run.device, "seed": run.seed, "force": run.force, "progress": progress}
        if model is not None:
            model = model_folder(model, run)
            info = compress_rps(model, out, opts, **common)
        else:
            info = train_rps(opts.from_config, out, opts, **common)
    if run.json_out:
        print_json(info)
        return
    table = Table("output", "mapping", "budget", "slots", "compressed params", "stored params", "resident")
    table.add_row(str(out), info["mapping"], f"{info['budget']:g}", human_count(info["slots"]),
                  human_count(info["compressed_params"]), human_count(info["stored_params"]),
                  human_bytes(info["resident_bytes"]))
    console.print(table)
    for key in ("relative_error", "heal_loss_first", "heal_loss_last", "train_loss_first", "train_loss_last"):
        if info.get(key) is not None:
            console.print(f"{key.replace('_', ' ')}: {info[key]:.4f}")
