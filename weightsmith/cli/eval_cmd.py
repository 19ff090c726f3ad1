from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer
from rich.table import Table

from . import app
from ..checkpoint.trust import remote_code
from .common import (DeviceOpt, JsonOpt, PickleOpt, QuietOpt, TrustCodeOpt, console, human_bytes, human_count,
                     print_json, progress_bars, short_name)


@app.command("eval")
def eval_cmd(
    models: Annotated[list[Path], typer.Argument(help="One or more model folders, compared side by side.")],
    data: Annotated[Path | None, typer.Option("--data", help="Text file, folder of .txt files, or .jsonl with a 'text' field (perplexity).")] = None,
    labelled: Annotated[Path | None, typer.Option("--labelled", help="jsonl/CSV with 'label' and 'text' (accuracy of *ForSequenceClassification models) or 'image', a file path relative to the data file (*ForImageClassification models, prepared by the folder's image processor).")] = None,
    tokenizer: Annotated[Path | None, typer.Option("--tokenizer", help="Tokenizer folder (default: each model's own).")] = None,
    context: Annotated[int | None, typer.Option("--context", help="Window length in tokens (default: the model's max positions).")] = None,
    stride: Annotated[int | None, typer.Option("--stride", help="Sliding-window stride (default: context/2).")] = None,
    max_tokens: Annotated[int | None, typer.Option("--max-tokens", help="Use at most this many tokens of --data.")] = None,
    batch_size: Annotated[int, typer.Option("--batch-size", help="Windows or examples per forward pass.")] = 8,
    dtype: Annotated[str | None, typer.Option("--dtype", help="Run in float32, bfloat16 or float16 (default: as stored).")] = None,
    device: DeviceOpt = "auto",
    json_out: JsonOpt = False,
    allow_pickle: PickleOpt = False,
    quiet: QuietOpt = False,
    trust_remote_code: TrustCodeOpt = False,
) -> None:
    """Perplexity, accuracy, parameters, size and tokens/s of model folders, in one table."""
    from ..eval import evaluate

    with remote_code(trust_remote_code), progress_bars(not quiet) as progress:
        rows = evaluate(models, data=data, labelled=labelled, tokenizer=tokenizer, context=context, stride=stride,
                        max_tokens=max_tokens, batch_size=batch_size, device=device, dtype=dtype,
                        allow_pickle=allow_pickle, progress=progress)
    if json_out:
        print_json([r.to_dict() for r in rows])
        return
    table = Table("model", "params", "size", *(["perplexity", "tokens", "tokens/s"] if data else []),
                  *(["accuracy"] if labelled else []))
    for r in rows:
        cells = [short_name(r.model, [x.model for x in rows]), human_count(r.params), human_bytes(r.size_bytes)]
        if data:
            cells += [f"{r.perplexity:.2f}", str(r.tokens), f"{r.tokens_per_s:,.0f}"]
        if labelled:
            cells.append(f"{r.accuracy:.4f}")
        table.add_row(*cells)
    console.print(table)
