from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from . import app
from ..checkpoint.trust import remote_code
from .common import (DeviceOpt, ForceOpt, JsonOpt, OutOpt, QuietOpt, SeedOpt, ShardOpt, TrustCodeOpt, console,
                     print_json, progress_bars)


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
def fold_cmd(
    model: Annotated[Path, typer.Argument(help="Plain model folder (causal LM or encoder).")],
    out: OutOpt,
    data: Annotated[Path, typer.Option("--data", help="Calibration text for gates, similarity and heal.")],
    remove: Annotated[float, typer.Option("--remove", help="Fraction of blocks to remove.")] = 0.25,
    share: Annotated[str, typer.Option("--share", help="Group size for weight sharing among kept blocks, or a comma list of sizes (1 = no sharing).")] = "1",
    share_init: Annotated[str, typer.Option("--share-init", help="Shared weights start from the group's average, first or middle block.")] = "average",
    importance: Annotated[str, typer.Option("--importance", help="loss (calibration loss measured with blocks taken out), gates (FoldGPT hard-concrete gates), bi (ShortGPT Block Influence) or angular (min angular-distance span).")] = "loss",
    gate_steps: Annotated[int, typer.Option("--gate-steps", help="Training steps for the gates.")] = 200,
    relax_rank: Annotated[int, typer.Option("--relax-rank", help="Per-block low-rank residual (SVD of original - shared) of this rank; 0 = off.")] = 0,
    heal_steps: Annotated[int, typer.Option("--heal-steps", help="Heal fine-tune steps with tail-layer distillation; 0 = no heal.")] = 0,
    heal_lr: Annotated[float, typer.Option("--heal-lr", help="Heal learning rate.")] = 3e-4,
    heal_tail: Annotated[int, typer.Option("--heal-tail", help="Last hidden states matched to the original's in the heal.")] = 2,
    heal_lora: Annotated[int, typer.Option("--heal-lora", help="Heal with peft LoRA adapters of this rank on the blocks' linear layers (merged back after; layers sharing a weight share an adapter); 0 = fine-tune the blocks' weights.")] = 0,
    seq: Annotated[int | None, typer.Option("--seq", help="Tokens per calibration window (default: min(positions, 128)).")] = None,
    max_tokens: Annotated[int, typer.Option("--max-tokens", help="Calibration tokens for the importance (and the heal, unless --heal-max-tokens).")] = 16384,
    heal_max_tokens: Annotated[int | None, typer.Option("--heal-max-tokens", help="Calibration tokens the heal trains on (default: --max-tokens).")] = None,
    batch_size: Annotated[int, typer.Option("--batch-size", help="Windows per step.")] = 8,
    seed: SeedOpt = 0,
    device: DeviceOpt = "auto",
    out_shard_size: ShardOpt = "5GB",
    force: ForceOpt = False,
    json_out: JsonOpt = False,
    quiet: QuietOpt = False,
    trust_remote_code: TrustCodeOpt = False,
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
    with remote_code(trust_remote_code), progress_bars(not quiet and not json_out) as progress:
        res = fold(model, out, data=data, remove=remove, share=share, share_init=share_init, importance=importance,
                   relax_rank=relax_rank, heal_steps=heal_steps, heal_lr=heal_lr, heal_tail=heal_tail, heal_lora=heal_lora,
                   gate_steps=gate_steps, seq=seq, max_tokens=max_tokens, heal_max_tokens=heal_max_tokens,
                   batch_size=batch_size, seed=seed,
                   device=device, max_shard_size=out_shard_size, force=force, progress=progress)
    if res.get("rank", 0) != 0:  # under accelerate launch only rank 0 reports
        return
    if json_out:
        print_json(res)
        return
    console.print(f"{importance}: scores {res['scores']}")
    console.print(f"removed blocks {res['removed']} of {res['blocks']}; kept {res['kept']} in groups {res['groups']}")
    console.print(f"parameters: {res['params_unique']:,} unique (original {res['params_original']:,})")
    if res.get("heal_steps"):
        console.print(f"heal: loss {res['heal_loss_first']:.4f} -> {res['heal_loss_last']:.4f} in {res['heal_steps']} steps")
    console.print("seconds: " + ", ".join(f"{k} {v:.1f}" for k, v in res["seconds"].items()))
    console.print(f"wrote {out}")
