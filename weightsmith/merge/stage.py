"""The ``merge`` stage: a recipe planned (``plan``), run by the engine (``execute``) into an atomic output
folder, with the config, tokenizer and model card beside the weights. Methods that need whole models or
data (greedy soup, PLeaS) run their own function instead (``Method.whole_model``).

Arithmetic is float32 by default. Under ``compat: mergekit`` it is done in the recipe's ``dtype`` (as
mergekit does: by the method's ``reference`` when that dtype is not float32), and the output is
written in ``out_dtype`` (else ``dtype``).
"""
from __future__ import annotations

import shutil
import time
from pathlib import Path

import torch

from ..checkpoint import ShardedWriter, check_output, copy_side_files, output_folder, parse_size, write_config
from ..checkpoint.card import write_model_card
from ..device import resolve_device, resolve_dtype
from ..errors import WeightsmithError
from ..progress import ProgressFn
from ..stage_options import MergeOptions
from .execute import Inputs, execute, prepass
from .plan import ADAPTER_CONFIG, ADAPTER_WEIGHTS, MergePlan, plan_merge
from .recipe import Recipe, resolve_recipe
from .registry import Method, get_method
from .values import ValueChecks


def merge(recipe: Recipe, out: str | Path, opts: MergeOptions | None = None, *, device: str = "auto", seed: int = 0,
          force: bool = False, progress: ProgressFn | None = None, metrics: list[dict] | None = None,
          **options) -> dict:
    """Run ``recipe`` into the folder ``out`` as ``opts`` says; returns a report dict (inputs, method, tensors,
    notes, seconds). Keywords naming ``MergeOptions`` fields replace them (``dtype=``, ``out_shard_size=``,
    ``allow_crimes=``, ...); any other is refused by name.

    ``out_shard_size``: bytes, or text as ``checkpoint.parse_size`` reads it (``5B`` = 5e9 bytes, as mergekit)."""
    known = MergeOptions.specs()
    opts = MergeOptions.build(opts, **{k: v for k, v in options.items() if k in known})
    extra = sorted(k for k in options if k not in known)
    parse_size(opts.out_shard_size)  # a bad size is refused before any input is opened
    method = get_method(recipe.method)
    if extra and method.whole_model:  # never dropped in silence: a whole-model method's settings are parameters
        raise WeightsmithError(f"method {method.name!r} takes no option {', '.join(map(repr, extra))}; give its "
                               f"settings as recipe parameters ({', '.join(p.name for p in method.params)})")
    if extra:
        raise WeightsmithError(f"method {method.name!r} does not take {', '.join(extra)}")
    recipe = resolve_recipe(recipe)  # options checked above: now the models are fetched if they must be
    if method.whole_model:
        return _whole_model(method, recipe, out, opts, device=device, seed=seed, force=force, progress=progress)
    plan = plan_merge(recipe, dtype=opts.dtype, allow_crimes=opts.allow_crimes)
    dev = resolve_device(device)
    checks = ValueChecks(plan.jobs, opts.allow_nonfinite)  # its header checks: before the output check ends a dry run
    check_output(out, recipe.inputs, force)
    start = time.perf_counter()
    inputs = Inputs(plan.jobs, dev)
    prepass(plan, inputs, progress)
    with output_folder(out, recipe.inputs, force, stage="merge", values_checked=True) as tmp:
        shard = "1000TB" if plan.adapter else parse_size(opts.out_shard_size)
        writer = ShardedWriter(tmp, [(j.name, j.dtype, j.shape) for j in plan.jobs], shard)
        execute(plan, inputs, writer, checks, seed=seed, progress=progress)
        writer.close()
        _write_beside(plan, tmp, opts)
        if opts.model_card:
            _write_card(plan, tmp, opts, seed, metrics)
    return {"out": str(out), "method": recipe.method, "inputs": recipe.inputs, "tensors": len(plan.jobs),
            "notes": plan.notes, "parameters": plan.card_parameters, "seconds": round(time.perf_counter() - start, 3),
            **({"nonfinite": checks.report} if checks.report else {})}


def _whole_model(method: Method, recipe: Recipe, out: str | Path, opts: MergeOptions, *, device: str, seed: int,
                 force: bool, progress: ProgressFn | None) -> dict:
    """A method that needs whole models or data: its parameters checked here, the rest is its own function's."""
    from .plan import as_slices, check_param_names

    check_param_names(method, recipe, as_slices(recipe, method), False, None)
    for p in method.params:
        if recipe.parameters.get(p.name) is not None:
            p.check(recipe.parameters[p.name], "recipe")
    return method.whole_model(recipe, out, device=device, dtype=opts.dtype,
                              out_shard_size=parse_size(opts.out_shard_size), seed=seed,
                              allow_crimes=opts.allow_crimes, force=force, progress=progress,
                              copy_tokenizer=opts.copy_tokenizer, model_card=opts.model_card,
                              allow_nonfinite=opts.allow_nonfinite)


def _write_beside(plan: MergePlan, tmp: Path, opts: MergeOptions) -> None:
    """What goes beside the weights: the adapter config or the model config, and the tokenizer."""
    recipe = plan.recipe
    if plan.adapter:
        (tmp / "model.safetensors").rename(tmp / ADAPTER_WEIGHTS)
        shutil.copy2(plan.reference.path / ADAPTER_CONFIG, tmp / ADAPTER_CONFIG)
    else:
        config = dict(plan.config or plan.reference.config or {})
        rows = next((j.rows for j in plan.jobs if j.rows is not None), None)
        if plan.vocabulary is not None and plan.vocabulary.rows_out is not None:
            rows = plan.vocabulary.rows_out
        if rows is not None and "vocab_size" in config:
            config["vocab_size"] = rows
        out_dt = resolve_dtype(opts.dtype or recipe.out_dtype or recipe.dtype)
        if out_dt is not None:
            key = "dtype" if "dtype" in config or "torch_dtype" not in config else "torch_dtype"
            config[key] = str(out_dt).removeprefix("torch.")
        write_config(tmp, config)
    if opts.copy_tokenizer:
        copy_side_files(plan.reference.path, tmp)
    if plan.vocabulary is not None and (opts.copy_tokenizer or plan.vocabulary.rows_out is not None):
        plan.vocabulary.write(tmp)
    elif plan.vocabulary is not None:
        plan.notes.append("chat_template not written: the tokenizer is not copied (--no-copy-tokenizer)")


def _write_card(plan: MergePlan, tmp: Path, opts: MergeOptions, seed: int, metrics: list[dict] | None) -> None:
    recipe = plan.recipe
    notes = "\n".join(f"- {n}" for n in plan.notes) or None
    arithmetic = str(plan.jobs[0].compute if plan.jobs else torch.float32).removeprefix("torch.")
    write_model_card(tmp, stage="merge", method=recipe.method, inputs=recipe.inputs,
                     parameters={**plan.card_parameters, "seed": seed,
                                 "dtype": str(opts.dtype or recipe.out_dtype or recipe.dtype or "as input"),
                                 "arithmetic": arithmetic},
                     recipe=recipe.text or recipe.to_yaml(), notes=notes, metrics=metrics)
