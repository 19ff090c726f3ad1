from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer
from rich.table import Table

from ..stage_options import EvalOptions
from ..checkpoint.trust import remote_code
from . import app
from .common import model_folder, with_tokenizer, RunFlags, console, human_bytes, human_count, print_json, progress_bars, short_name
from .options import with_options


@app.command("eval")
@with_options(RunFlags, "run", only=("device", "json_out", "allow_pickle", "quiet", "trust_remote_code", "offline"))
@with_options(EvalOptions)
def eval_cmd(
    models: Annotated[list[Path], typer.Argument(help="One or more model folders, compared side by side.")],
    opts: EvalOptions,
    run: RunFlags = None,
) -> None:
    """Perplexity, accuracy, parameters, size and tokens/s of model folders, in one table."""
    from ..eval import evaluate

    with remote_code(run.trust_remote_code), progress_bars(not run.quiet) as progress:
        given = {str(model_folder(m, run)): str(m) for m in models}  # rows named as the user named the models
        models = [Path(f) for f in given]
        opts = with_tokenizer(opts, run)
        rows = evaluate(models, opts, device=run.device, allow_pickle=run.allow_pickle, progress=progress)
    if run.json_out:
        print_json([r.to_dict() for r in rows])
        return
    data, labelled = opts.data, opts.labelled
    table = Table("model", "params", "size", *(["perplexity", "tokens", "tokens/s"] if data else []),
                  *(["accuracy"] if labelled else []))
    for r in rows:
        cells = [short_name(given.get(r.model, r.model), [given.get(x.model, x.model) for x in rows]),
                 human_count(r.params), human_bytes(r.size_bytes)]
        if data:
            cells += [f"{r.perplexity:.2f}", str(r.tokens), f"{r.tokens_per_s:,.0f}"]
        if labelled:
            cells.append(f"{r.accuracy:.4f}")
        table.add_row(*cells)
    console.print(table)
