from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from ..stage_options import EvalOptions
from ..checkpoint.trust import remote_code
from . import app
from .common import RunFlags, Table, console, human_bytes, human_count, model_folder, print_json, progress_bars, short_name, with_tokenizer
from .options import with_options


# the measures a row may carry, in table order (an encoder against --reference has the last three)
COLUMNS = (("perplexity", "{:.2f}"), ("tokens", "{}"), ("tokens_per_s", "{:,.0f}"), ("accuracy", "{:.4f}"),
           ("cosine", "{:.4f}"), ("cosine_min", "{:.4f}"), ("spearman", "{:.4f}"))


@app.command("eval")
@with_options(RunFlags, "run", only=("device", "json_out", "allow_pickle", "quiet", "trust_remote_code", "offline"))
@with_options(EvalOptions)
def eval_cmd(
    models: Annotated[list[Path], typer.Argument(help="One or more model folders, compared side by side.")],
    opts: EvalOptions,
    run: RunFlags = None,
) -> None:
    """Perplexity, accuracy, parameters, size and tokens/s of model folders, in one table; for encoders with
    --reference, the agreement of their sentence embeddings with the reference's."""
    from ..eval import evaluate

    with remote_code(run.trust_remote_code), progress_bars(not run.quiet) as progress:
        given = {str(model_folder(m, run)): str(m) for m in models}  # rows named as the user named the models
        models = [Path(f) for f in given]
        opts = with_tokenizer(opts, run)
        rows = evaluate(models, opts, device=run.device, allow_pickle=run.allow_pickle, progress=progress)
    if run.json_out:
        print_json([r.to_dict() for r in rows])
        return
    columns = [(name, fmt) for name, fmt in COLUMNS if any(r.to_dict().get(name) is not None for r in rows)]
    table = Table("model", "params", "size", *(name.replace("_", " ") for name, _ in columns))
    for r in rows:
        d = r.to_dict()
        cells = [short_name(given.get(r.model, r.model), [given.get(x.model, x.model) for x in rows]),
                 human_count(r.params), human_bytes(r.size_bytes)]
        table.add_row(*cells, *("" if d.get(name) is None else fmt.format(d[name]) for name, fmt in columns))
    console.print(table)
