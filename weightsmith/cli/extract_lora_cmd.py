"""``weightsmith extract-lora``: a fine-tune minus its base as a PEFT LoRA adapter, with mergekit-extract-lora's
options (its --model / --base-model / --out-path spellings are accepted too)."""
from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from ..errors import WeightsmithError
from ..stage_options import ExtractLoraOptions
from . import app
from .common import (RunFlags, Table, console, human_bytes, human_count, model_folder, print_json, progress_bars,
                     with_tokenizer)
from .options import with_options


@app.command("extract-lora")
@with_options(RunFlags, "run", only=("device", "seed", "force", "json_out", "quiet", "offline"))
@with_options(ExtractLoraOptions)
def extract_lora_cmd(
    finetuned: Annotated[Path | None, typer.Argument(help="Fine-tuned model: a folder, org/name[@revision] or "
                                                         "model+adapter.")] = None,
    model: Annotated[Path | None, typer.Option("--model", help="The fine-tuned model (mergekit's spelling of "
                                                                "FINETUNED).")] = None,
    out: Annotated[Path, typer.Option("--out", "-o", "--out-path", help="Adapter folder to write (atomically).")] = ...,
    opts: ExtractLoraOptions = None,
    run: RunFlags = None,
) -> None:
    """Per linear/embedding layer, the truncated SVD of (fine-tune − base), saved as a PEFT LoRA adapter
    (adapter_config.json + adapter_model.safetensors) that peft.PeftModel.from_pretrained(base, OUT) loads.
    Embeddings and non-linear modules (norms) are saved at full rank as modules_to_save unless told otherwise,
    as mergekit-extract-lora does. --rank auto --energy 0.95 picks each layer's rank from its spectrum; --data
    adds held-out perplexity of base, base + adapter and fine-tune."""
    from dataclasses import replace

    from ..compressor.lora_extract import extract_lora

    if (finetuned is None) == (model is None):
        raise WeightsmithError("give the fine-tuned model once: FINETUNED or --model")
    ft = model_folder(finetuned or model, run)
    opts = replace(with_tokenizer(opts, run), base=model_folder(opts.base, run))
    with progress_bars(not run.quiet) as progress:
        info = extract_lora(ft, out, opts, device=run.device, seed=run.seed, force=run.force, progress=progress)
    if run.json_out:
        print_json(info)
        return
    table = Table("adapter", "LoRA modules", "r", "full-rank kinds", "params", "size", "of the fine-tune")
    table.add_row(str(out), str(info["modules"]), str(info["r"]), str(len(info["full_rank_modules"])),
                  human_count(info["adapter_params"]), human_bytes(info["adapter_bytes"]),
                  f"{info['adapter_params'] / info['finetune_params']:.1%}")
    console.print(table)
    if "eval" in info:
        rows = Table("model", "perplexity", "tokens", "size")
        for r in info["eval"]:
            rows.add_row(r["role"], f"{r['perplexity']:.3f}", str(r["tokens"]), human_bytes(r["size_bytes"]))
        console.print(rows)
