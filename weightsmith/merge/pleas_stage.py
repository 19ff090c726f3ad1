"""PLeaS on model folders: the stage (``weightsmith pleas``, and ``merge`` with method ``pleas``). Checks both
checkpoints, matches and refits block by block (``pleas_blocks``), writes the merged folder and its card."""
from __future__ import annotations

import time
from pathlib import Path

import torch
from torch import nn

from ..errors import InvalidChoice, MissingOption, UnknownOption, WeightsmithError
from ..progress import ProgressFn
from ..stage_options import PleasOptions
from .align.spec import spec_for
from .pleas import INPUTS, MERGED, _timed, merge_counts
from .pleas_blocks import Pair, Refit, match_blocks, merge_blocks, merged_shape
from .values import check_whole_models


def _pair(model_a, model_b, o: PleasOptions, dev):
    """Both checkpoints (gated, shapes checked), the model on the meta device, its spec and the batches."""
    from ..loading import meta_model, stored_names
    from .align.folders import check_pair, lm_batches

    ckpts = check_pair(model_a, model_b)
    skeleton = meta_model(ckpts[0], Path(model_a))
    spec = spec_for(skeleton)
    if spec.kind != "llama":
        raise WeightsmithError(f"{model_a}: PLeaS on model folders supports the Llama family")
    names = tuple(stored_names(skeleton, c, Path(m)) for c, m in zip(ckpts, (model_a, model_b)))
    batches = lm_batches(model_a, o.data, max_tokens=o.max_tokens, seq_len=o.seq_len, batch_size=o.batch_size)
    return Pair(ckpts, names, skeleton, spec, batches, dev)


def _write_blocks(pair, plans, o: PleasOptions, folder: Path, dtype, check_merged, seed: int, progress) -> dict:
    """Run the block-by-block merge into ``folder``'s shards; returns the seconds per pass."""
    from ..checkpoint import ShardedWriter

    ca = pair.ckpts[0]
    stored = [n for n in ca.names() if not (pair.skeleton.config.tie_word_embeddings and n == "lm_head.weight")]
    out_dtype = {n: dtype or ca.info(n).torch_dtype for n in stored}
    writer = ShardedWriter(folder, [(n, out_dtype[n], merged_shape(pair.spec, plans, n, tuple(ca.info(n).shape)))
                                    for n in stored], o.out_shard_size)

    def write(path: str, module: nn.Module) -> None:
        state = {f"{path}.{k}": v.detach().to("cpu", out_dtype[f"{path}.{k}"]).contiguous()
                 for k, v in module.state_dict().items() if f"{path}.{k}" in out_dtype}
        check_merged(state)
        for name, t in state.items():
            writer.write(name, t)

    how = Refit(o.least_squares, o.inputs, o.ridge, 8192, seed)
    merge_blocks(pair, plans, how, write, progress)
    writer.close()


def pleas_merge(model_a: str | Path, model_b: str | Path, opts: PleasOptions | None = None, *, out: str | Path,
                dtype: str | None = None, recipe: str | None = None, seed: int = 0, device: str = "auto",
                force: bool = False, progress: ProgressFn | None = None, copy_tokenizer: bool = True,
                model_card: bool = True, allow_nonfinite: bool = False, **values) -> dict:
    """PLeaS-merge two model folders (Llama/Mistral/Qwen2 causal LMs) into ``out``; ``data`` is calibration text
    (the fine-tuning data, or generic text for the data-free variant). The MLP intermediate widens to
    ``width``× (config ``intermediate_size`` changes, so stock ``from_pretrained`` loads the result).
    The models are read a block at a time (``pleas_blocks``): one block of each and of the result is held.
    The merge value checks apply (``values.check_whole_models``: NaN/inf inputs refused unless
    ``allow_nonfinite``, non-finite or all-zero results refused). ``copy_tokenizer``/``model_card``: write
    model A's tokenizer files and the model card. ``values`` override fields of ``opts`` (a :class:`PleasOptions`)."""
    from ..checkpoint import Checkpoint, check_output, copy_side_files, output_folder, write_config
    from ..device import resolve_device, resolve_dtype

    o = PleasOptions.build(opts, **values)
    if o.inputs not in INPUTS:
        raise InvalidChoice("inputs", o.inputs, INPUTS)
    check_output(out, [model_a, model_b], force)
    dev = resolve_device(device)
    torch.manual_seed(seed)
    pair = _pair(model_a, model_b, o, dev)
    nonfinite, check_merged = check_whole_models([(Path(m), c.lazy(n)) for m, c, n in
                                                  zip((model_a, model_b), pair.ckpts, pair.names)], allow_nonfinite)
    times: dict[str, float] = {}
    with _timed(times, "activation_statistics_s"):
        plans = match_blocks(pair, merge_counts(pair.spec, o.width), o.metric, progress)
    config = dict(Checkpoint(model_a).config)
    widths = {plans[g].width for g, grp in pair.spec.groups.items() if grp.partial}
    if len(widths) > 1:
        raise WeightsmithError(f"MLP widths differ between blocks ({sorted(widths)}); no single intermediate_size")
    if widths:
        config["intermediate_size"] = widths.pop()
    out_dtype = resolve_dtype(dtype) if dtype is not None else None
    if out_dtype is not None:
        config["torch_dtype"] = config["dtype"] = str(out_dtype).removeprefix("torch.")
    with output_folder(out, [model_a, model_b], force, stage="pleas", values_checked=True) as folder:
        with _timed(times, "least_squares_s"):
            _write_blocks(pair, plans, o, folder, out_dtype, check_merged, seed, progress)
        write_config(folder, config)
        if copy_tokenizer:
            copy_side_files(model_a, folder)
        written = Checkpoint(folder)
        params, params_a = written.num_params, pair.ckpts[0].num_params
        report = {"width": o.width, "least_squares": o.least_squares, "params": params,
                  "size_vs_a": round(params / params_a, 4),
                  "merged_units": {g: int((p.kind == MERGED).sum()) for g, p in plans.items()},
                  "units": {g: p.width for g, p in plans.items()}, **{k: round(v, 3) for k, v in times.items()},
                  "model_a": str(model_a), "model_b": str(model_b), "out": str(out), "data": str(o.data),
                  "tensors": len(written), "intermediate_size": config.get("intermediate_size")}
        if nonfinite:
            report["nonfinite"] = nonfinite
        if model_card:
            _card(folder, model_a, model_b, o, seed, recipe, report)
    return report


def _card(folder: Path, model_a, model_b, o: PleasOptions, seed: int, recipe, report: dict) -> None:
    from ..checkpoint.card import write_model_card

    write_model_card(folder, stage="merge", method="pleas", inputs=[str(model_a), str(model_b)], recipe=recipe,
                     parameters={**o.to_dict(exclude=("out_shard_size",)), "seed": seed},
                     notes="PLeaS (Nasery et al. 2024, https://arxiv.org/abs/2407.02447): activation-matched "
                           "permutations, partial merging of the best-matched MLP units, layer-wise least "
                           f"squares on both models' activations. Parameters: {report['size_vs_a']}× model A.",
                     tags=["pleas"])


RECIPE_PARAMS = tuple(n for n in PleasOptions.specs() if n != "out_shard_size")


def merge_recipe(recipe, out: str | Path, *, device: str = "auto", dtype: str | None = None,
                 out_shard_size: str | int = "5GB", seed: int = 0, force: bool = False,
                 progress: ProgressFn | None = None, copy_tokenizer: bool = True, model_card: bool = True,
                 allow_nonfinite: bool = False, allow_crimes: bool = False) -> dict:
    """``weightsmith merge`` entry point (method ``pleas``): two models, ``data`` and ``width`` parameters.
    ``allow_crimes`` changes nothing here: PLeaS merges models of different bases by design."""
    params = {k: v for k, v in recipe.parameters.items() if v is not None}
    unknown = set(params) - set(RECIPE_PARAMS)
    if unknown:
        raise UnknownOption(sorted(unknown)[0], RECIPE_PARAMS)
    if len(recipe.models) != 2:
        raise WeightsmithError(f"pleas merges exactly two models, got {len(recipe.models)}")
    if params.get("data") is None:
        raise MissingOption("data", "pleas needs calibration text (fine-tuning data, or generic text)")
    if "width" in params:
        params["width"] = float(params["width"])
    start = time.perf_counter()
    a, b = (m.path for m in recipe.models)
    rep = pleas_merge(a, b, PleasOptions(**params, out_shard_size=str(out_shard_size)), out=out, device=device,
                      dtype=dtype or recipe.dtype, seed=seed, force=force, progress=progress,
                      recipe=recipe.text or recipe.to_yaml(), copy_tokenizer=copy_tokenizer, model_card=model_card,
                      allow_nonfinite=allow_nonfinite)
    return {**rep, "inputs": [a, b], "method": "pleas",
            "notes": [f"width {rep['width']}: intermediate_size {rep['intermediate_size']}, "
                      f"{rep['size_vs_a']}x the parameters of {Path(a).name}"],
            "seconds": time.perf_counter() - start}
