from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from . import app
from ..checkpoint.trust import remote_code
from .common import (DeviceOpt, ForceOpt, JsonOpt, OutOpt, QuietOpt, SeedOpt, ShardOpt, TrustCodeOpt, console,
                     print_json, progress_bars)

MetricOpt = Annotated[str, typer.Option("--metric", help="Activation similarity: euclidean (−Σ‖a−b‖², as the PLeaS "
                                                         "reference code) or correlation.")]
MaxTokOpt = Annotated[int, typer.Option("--max-tokens", help="Calibration tokens read from --data.")]
SeqOpt = Annotated[int, typer.Option("--seq-len", help="Tokens per calibration window.")]
BatchOpt = Annotated[int, typer.Option("--batch-size", help="Windows per forward pass.")]


@app.command("align")
def align_cmd(
    model_a: Annotated[Path, typer.Argument(help="Reference model folder (its basis is kept).")],
    model_b: Annotated[Path, typer.Argument(help="Model folder to permute into A's basis.")],
    out: OutOpt,
    data: Annotated[Path | None, typer.Option("--data", help="Calibration text (needed by --method activation).")] = None,
    method: Annotated[str, typer.Option("--method", help="weight: Git Re-Basin weight matching, no data; "
                                                         "activation: matching on activations over --data.")] = "weight",
    metric: MetricOpt = "euclidean",
    max_tokens: MaxTokOpt = 8192,
    seq_len: SeqOpt = 128,
    batch_size: BatchOpt = 8,
    seed: SeedOpt = 0,
    device: DeviceOpt = "auto",
    out_shard_size: ShardOpt = "5GB",
    force: ForceOpt = False,
    json_out: JsonOpt = False,
    quiet: QuietOpt = False,
    trust_remote_code: TrustCodeOpt = False,
) -> None:
    """Permute B's units (residual stream, heads, MLP units) into A's basis; OUT computes the same function as B."""
    from ..merge.align.folders import align

    with remote_code(trust_remote_code), progress_bars(not quiet) as progress:
        report = align(model_a, model_b, out, method=method, data=data, metric=metric, max_tokens=max_tokens,
                       seq_len=seq_len, batch_size=batch_size, seed=seed, device=device, force=force,
                       max_shard_size=out_shard_size, progress=progress)
    if json_out:
        print_json(report)
    else:
        console.print(f"aligned {model_b} onto {model_a} ({report['method']} matching): {report['units_moved']} of "
                      f"{report['units']} units in {report['groups']} groups moved, {report['matching_s']:.1f} s -> {out}")


@app.command("pleas")
def pleas_cmd(
    model_a: Annotated[Path, typer.Argument(help="First model folder (Llama/Mistral/Qwen2).")],
    model_b: Annotated[Path, typer.Argument(help="Second model folder, same architecture, any base.")],
    data: Annotated[Path, typer.Option("--data", help="Calibration text: the fine-tuning data, or generic text (data-free).")],
    out: OutOpt,
    width: Annotated[float, typer.Option("--width", help="Size in model multiples, 1.0-2.0: each widening group keeps "
                                                         "width×n units (Llama: the MLP intermediate).")] = 1.2,
    metric: MetricOpt = "euclidean",
    ridge: Annotated[float, typer.Option("--ridge", help="Least-squares ridge, relative to the mean Gram diagonal.")] = 1e-4,
    least_squares: Annotated[bool, typer.Option("--least-squares/--no-least-squares", help="Refit every layer in "
                                                "closed form (off: ZipIt!-style partial zip).")] = True,
    inputs: Annotated[str, typer.Option("--inputs", help="Least-squares inputs: merged (the merged model's own, "
                                                         "layer by layer) or original (both models', one pass).")] = "merged",
    max_tokens: MaxTokOpt = 8192,
    seq_len: SeqOpt = 128,
    batch_size: BatchOpt = 8,
    seed: SeedOpt = 0,
    device: DeviceOpt = "auto",
    out_shard_size: ShardOpt = "5GB",
    force: ForceOpt = False,
    json_out: JsonOpt = False,
    quiet: QuietOpt = False,
    trust_remote_code: TrustCodeOpt = False,
) -> None:
    """PLeaS: merge two models (possibly from different bases) into one of --width× size."""
    from ..merge.pleas import pleas_merge

    with remote_code(trust_remote_code), progress_bars(not quiet) as progress:
        report = pleas_merge(model_a, model_b, data, width, out=out, metric=metric, ridge=ridge,
                             least_squares=least_squares, inputs=inputs, max_tokens=max_tokens, seq_len=seq_len,
                             batch_size=batch_size, seed=seed, device=device, force=force,
                             max_shard_size=out_shard_size, progress=progress)
    if json_out:
        print_json(report)
    else:
        console.print(f"PLeaS {report['width']}x: intermediate_size {report['intermediate_size']}, "
                      f"{report['params']:,} params ({report['size_vs_a']}x A) -> {out}")
