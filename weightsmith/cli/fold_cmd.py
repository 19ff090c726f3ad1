from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from . import app
from ..checkpoint.trust import remote_code
from ..stage_options import FoldOptions
from .common import model_folder, OutOpt, RunFlags, console, print_json, progress_bars
from .options import with_options


def relaunch_cpu_ranks() -> None:
    """Under `accelerate launch --cpu --num_processes N`, which starts one process, become the N gloo ranks."""
    import os
    import sys

    from ..fold.ranks import cpu_ranks_command, parent_argv

    command = cpu_ranks_command(os.environ, parent_argv(), sys.argv[1:])
    if command:
        sys.stdout.flush()
        sys.stderr.flush()
        os.execv(command[0], command)


@app.command("fold")
@with_options(RunFlags, "run", only=("seed", "device", "force", "json_out", "quiet", "trust_remote_code", "offline"))
@with_options(FoldOptions)
def fold_cmd(
    model: Annotated[Path, typer.Argument(help="Plain model folder (causal LM or encoder).")],
    out: OutOpt,
    opts: FoldOptions,
    run: RunFlags = None,
) -> None:
    """FoldGPT: remove the least important blocks, share weights within groups of adjacent kept blocks, heal.

    Importance "loss": the calibration loss (LM loss; for encoders 1 - cos of the pooled sentence embedding
    to the original's) with each block, span or beam-searched set taken out. Heal: LM loss + logit KD + MSE on
    the last --heal-tail hidden states (encoders: MSE + pooled-embedding cosine), training the blocks' weights
    or, with --heal-lora, LoRA adapters merged back into them. Data-parallel under
    `accelerate launch --num_processes N -m weightsmith fold ...` (rank 0 writes).
    """
    from ..fold.stage import fold

    relaunch_cpu_ranks()
    with remote_code(run.trust_remote_code), progress_bars(not run.quiet and not run.json_out) as progress:
        model = model_folder(model, run)
        res = fold(model, out, opts, seed=run.seed, device=run.device, force=run.force, progress=progress)
    if res.get("rank", 0) != 0:  # under accelerate launch only rank 0 reports
        return
    if run.json_out:
        print_json(res)
        return
    console.print(f"{opts.importance}: scores {res['scores']}")
    console.print(f"removed blocks {res['removed']} of {res['blocks']}; kept {res['kept']} in groups {res['groups']}")
    console.print(f"parameters: {res['params_unique']:,} unique (original {res['params_original']:,})")
    if res.get("heal_steps"):
        console.print(f"heal: loss {res['heal_loss_first']:.4f} -> {res['heal_loss_last']:.4f} in {res['heal_steps']} steps")
    console.print("seconds: " + ", ".join(f"{k} {v:.1f}" for k, v in res["seconds"].items()))
    console.print(f"wrote {out}")
