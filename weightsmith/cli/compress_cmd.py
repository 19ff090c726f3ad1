from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer
from rich.table import Table

from . import app
from ..checkpoint.trust import remote_code
from .common import (DeviceOpt, ForceOpt, JsonOpt, OutOpt, QuietOpt, SeedOpt, TrustCodeOpt, console, human_bytes,
                     human_count, print_json, progress_bars)

compress_app = typer.Typer(help="Compress a checkpoint under a parameter budget.", no_args_is_help=True)
app.add_typer(compress_app, name="compress")


@compress_app.command("rps")
def rps_cmd(
    model: Annotated[Path | None, typer.Argument(help="Trained model folder to project into hashed memory.")] = None,
    out: OutOpt = ...,
    budget: Annotated[float, typer.Option("--budget", help="Stored / original parameters of the compressed modules.")] = 0.1,
    mapping: Annotated[str, typer.Option("--mapping", help="stable (RandomFold + gradient scaling) or roast (hashed tiles).")] = "stable",
    modules: Annotated[str | None, typer.Option("--modules", help="Regex over module names (nn.Linear / nn.Embedding) to compress. Default: every nn.Linear inside the transformer blocks, not embeddings, lm_head or norms.")] = None,
    sharing: Annotated[str, typer.Option("--sharing", help="global: one memory for all modules; module: one per module.")] = "global",
    tile: Annotated[int, typer.Option("--tile", help="ROAST tile size in weights.")] = 64,
    heal_steps: Annotated[int, typer.Option("--heal-steps", help="Fine-tuning steps on --data after projecting (0: none).")] = 0,
    from_config: Annotated[Path | None, typer.Option("--from-config", help="config.json or model folder: build an RPS model from scratch instead of projecting MODEL.")] = None,
    train: Annotated[bool, typer.Option("--train", help="With --from-config: train the new model on --data.")] = False,
    train_steps: Annotated[int, typer.Option("--train-steps", help="Training steps with --from-config --train.")] = 500,
    data: Annotated[Path | None, typer.Option("--data", help="Text file for healing / training.")] = None,
    tokenizer: Annotated[Path | None, typer.Option("--tokenizer", help="Tokenizer folder (default: beside the model/config).")] = None,
    lr: Annotated[float | None, typer.Option("--lr", help="Peak learning rate (default: 1e-3 healing, 4e-3 training).")] = None,
    batch: Annotated[int, typer.Option("--batch", help="Sequences per step.")] = 16,
    seq: Annotated[int, typer.Option("--seq", help="Tokens per sequence.")] = 64,
    device: DeviceOpt = "auto",
    seed: SeedOpt = 0,
    force: ForceOpt = False,
    json_out: JsonOpt = False,
    quiet: QuietOpt = False,
    trust_remote_code: TrustCodeOpt = False,
) -> None:
    """Randomized parameter sharing (ROAST / STABLE-RPS): every compressed weight is read from one hashed memory."""
    from ..compressor.rps import compress_rps, train_rps
    from ..errors import WeightsmithError

    if (model is None) == (from_config is None):
        raise WeightsmithError("give either MODEL (project a trained model) or --from-config CONFIG (train from scratch)")
    if from_config is not None and not train:
        raise WeightsmithError("--from-config builds an untrained model; add --train --data TEXT")
    common = dict(budget=budget, mapping=mapping, modules=modules, sharing=sharing, tile=tile, data=data,
                  batch=batch, seq=seq, device=device, seed=seed, force=force)
    with remote_code(trust_remote_code), progress_bars(not quiet) as progress:
        if model is not None:
            info = compress_rps(model, out, heal_steps=heal_steps, lr=lr or 1e-3, progress=progress, **common)
        else:
            info = train_rps(from_config, out, train_steps=train_steps, lr=lr or 4e-3, tokenizer=tokenizer,
                             progress=progress, **common)
    if json_out:
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
