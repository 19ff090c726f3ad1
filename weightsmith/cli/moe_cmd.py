"""``weightsmith moe``: a mergekit-moe config -> a Mixtral / Qwen2-MoE folder; ``--explain`` shows a built MoE's
routing of prompts. mergekit-moe's quantised-loading flags are refused by name."""
from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from ..errors import WeightsmithError
from ..stage_options import MoeOptions
from . import app
from .common import RunFlags, Table, console, go_offline, model_folder, print_json, progress_bars
from .options import with_options

QUANTISED = "weightsmith runs the base in --hidden-dtype (bfloat16 by default); 4/8-bit loading is not supported"


def _refuse_quantised(ctx: typer.Context, param: typer.CallbackParam, value: bool) -> bool:
    if value:
        raise WeightsmithError(f"{param.opts[0]} (a mergekit-moe option): {QUANTISED}")
    return value


Quantised4 = Annotated[bool, typer.Option("--load-in-4bit", hidden=True, callback=_refuse_quantised)]
Quantised8 = Annotated[bool, typer.Option("--load-in-8bit", hidden=True, callback=_refuse_quantised)]


@app.command("moe")
@with_options(RunFlags, "run", only=("device", "seed", "force", "json_out", "quiet", "offline"))
@with_options(MoeOptions)
def moe_cmd(
    config: Annotated[Path | None, typer.Argument(help="mergekit-moe YAML: base_model, experts, gate_mode, ...")] = None,
    out: Annotated[Path | None, typer.Argument(help="Output folder (written atomically).")] = None,
    opts: MoeOptions = None,
    run: RunFlags = None,
    load_in_4bit: Quantised4 = False,
    load_in_8bit: Quantised8 = False,
) -> None:
    """Build a Mixture of Experts from dense models as mergekit-moe does: attention, norms and embeddings from
    base_model, each expert's MLP from its source_model, routers from the prompts' hidden states (hidden), token
    embeddings (cheap_embed) or random (random, uniform_random). Mixtral for Llama/Mistral experts; Qwen2-MoE with
    one shared expert. `weightsmith moe --explain MOE --data PROMPTS` prints which experts each prompt reaches."""
    if opts.explain is not None:
        if config is not None or out is not None:
            raise WeightsmithError("--explain reads a built MoE; give no CONFIG or OUT with it")
        return _explain(opts, run)
    if config is None or out is None:
        raise WeightsmithError("give CONFIG and OUT (or --explain MOE --data PROMPTS)")
    from ..merge.moe import build_moe

    go_offline(run.offline)
    with progress_bars(not run.quiet) as progress:
        info = build_moe(config, out, opts, device=run.device, seed=run.seed, force=run.force, progress=progress)
    if run.json_out:
        print_json(info)
        return
    console.print(f"{info['architecture']}: {info['experts']} experts"
                  f"{' + 1 shared' if info['shared_experts'] else ''}, gates {info['gate_mode']}, "
                  f"{info['layers']} layers -> {out} ({info['tensors']} tensors, {info['seconds']:.1f}s)",
                  highlight=False)
    if info["degenerate_layers"]:
        console.print(f"note: layers {info['degenerate_layers']} have nearly dependent router rows (similar "
                      "prompts): some experts there will rarely be chosen", highlight=False)


def _explain(opts: MoeOptions, run: RunFlags) -> None:
    from ..merge.moe_router import explain_routing

    with progress_bars(not run.quiet) as progress:
        report = explain_routing(model_folder(opts.explain, run), opts.data, device=run.device, progress=progress)
    if run.json_out:
        print_json(report)
        return
    k, layers = report["experts_per_token"], len(report["prompts"][0]["shares"]) if report["prompts"] else 0
    table = Table("prompt", "tokens", *[f"layer {i}" for i in range(layers)], "overall")
    for row in report["prompts"]:
        cells = [" ".join(f"e{e}:{s:.0%}" for e, s in _top(shares, k)) for shares in row["shares"]]
        overall = [sum(col) / layers for col in zip(*row["shares"])]
        table.add_row(row["prompt"][:40], str(row["tokens"]), *cells, " ".join(f"e{e}" for e, _ in _top(overall, k)))
    console.print(table)
    console.print(f"each cell: the experts receiving the most of the prompt's tokens (top {k} per token; shares of "
                  "tokens)", highlight=False)


def _top(shares: list[float], k: int) -> list[tuple[int, float]]:
    return sorted(enumerate(shares), key=lambda x: -x[1])[:k]
