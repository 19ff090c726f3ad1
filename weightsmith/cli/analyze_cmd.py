from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from ..stage_options import AnalyzeOptions
from ..checkpoint.trust import remote_code
from . import app
from .common import RunFlags, Table, console, model_folder, print_json, progress_bars, with_tokenizer
from .options import with_options


@app.command("analyze")
@with_options(RunFlags, "run", only=("device", "force", "json_out", "quiet", "trust_remote_code", "offline"))
@with_options(AnalyzeOptions)
def analyze_cmd(
    model: Annotated[Path, typer.Argument(help="Model folder (causal LM or encoder).")],
    opts: AnalyzeOptions,
    out: Annotated[Path | None, typer.Option("--out", "-o", help="New folder for analysis.json and heatmap.png "
                                                                "(written atomically).")] = None,
    run: RunFlags = None,
) -> None:
    """Per-block angular distance (l to l+n), Block Influence and linear CKA from one forward pass.

    Angular distance d(l, l+n) = arccos(cos(x_l, x_{l+n}))/pi is taken on the last token of each window
    (Gromov et al.) and also averaged over all tokens; BI_i = 1 - mean cos(x_i, x_{i+1}) (ShortGPT).
    """
    from ..fold.analyze import analyze

    with remote_code(run.trust_remote_code), progress_bars(not run.quiet and not run.json_out) as progress:
        model = model_folder(model, run)
        opts = with_tokenizer(opts, run)
        rep = analyze(model, out, opts, device=run.device, force=run.force, progress=progress)
    if run.json_out:
        print_json(rep)
        return
    n = rep["num_blocks"]
    table = Table()
    for col in ("block", "BI", "d(l,l+1) last", "d(l,l+1) mean", "CKA(l,l+1)"):
        table.add_column(col, justify="right")
    for i in range(n):
        table.add_row(str(i), f"{rep['block_influence'][i]:.4f}", f"{rep['angular_distance_last_token'][i][0]:.4f}",
                      f"{rep['angular_distance_mean'][i][0]:.4f}", f"{rep['cka'][i][i + 1]:.4f}")
    console.print(f"{model}: {n} blocks, {rep['tokens']} tokens", soft_wrap=True)  # a path stays on one line
    console.print(table)
    console.print(f"remove {rep['remove']} of {n}: ShortGPT (lowest BI) drops blocks {rep['shortgpt_drop']}; "
                  f"angular distance drops span {rep['angular_drop']}")
    for k, v in rep["angular_drop_by_n"].items():
        console.print(f"  angular, n={k}: blocks {v['blocks']} (d={v['distance']:.4f})")
    for f in rep.get("files", []):
        console.print(f"wrote {f}")
