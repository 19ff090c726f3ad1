"""``weightsmith merge``: a mergekit-style YAML recipe, or the same merge described by flags.

The method list in the help and ``--list-methods`` come from the merge registry. mergekit-yaml's
options are accepted where they mean something here and refused by name otherwise.
"""
from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from . import app
from .common import DeviceOpt, ForceOpt, JsonOpt, QuietOpt, SeedOpt, console, print_json, progress_bars

HELP_HEAD = """Merge checkpoints into one, streaming one tensor at a time.

RECIPE is mergekit YAML (merge_method, base_model, models with per-model parameters, global
parameters, dtype, out_dtype); parameter values may be layer gradients ([0.2, 0.8]) or filtered
([{filter: self_attn, value: 0.5}, {value: 0.2}]). Without RECIPE, give --method and --model flags.
`weightsmith merge --list-methods` lists every method with its parameters (--json for a machine).

Arithmetic is float32 by default. --compat mergekit gives mergekit 0.1.5's choices where the paper
and mergekit differ (TIES trims per tensor; DARE rescale l1; breadcrumbs masks per tensor) and
does the arithmetic in the recipe's dtype as mergekit does, writing out_dtype when given.
Embedding / lm_head tensors whose vocabulary rows differ are cropped to the common first rows,
as mergekit's truncation does; any other shape mismatch is an error. `slices:` (sources with
layer_range) stacks layers; tokenizer_source / tokenizer: / chat_template build the output
tokenizer and re-index the vocabulary rows as mergekit does.
"""

# mergekit-yaml options (mergekit 0.1.5 options.py) that mean nothing here: refused by name, with why.
MERGEKIT_REFUSED = {
    "--trust-remote-code": "weightsmith never runs code from a model folder",
    "--no-safe-serialization": "weightsmith writes safetensors only",
    "--clone-tensors": "weightsmith writes each tensor once; layer stacking copies what it needs",
    "--transformers-cache": "weightsmith reads local folders only; give paths",
    "--lora-merge-cache": "LoRA references (model+lora) are not supported; merge the adapter first",
    "--lora-merge-dtype": "LoRA references (model+lora) are not supported; merge the adapter first",
    "--low-cpu-memory": "memory is already bounded by the inputs' copies of the largest tensor",
    "--read-to-gpu": "use --device cuda",
    "--multi-gpu": "weightsmith merges on one --device",
    "--gpu-rich": "use --device cuda",
    "--write-threads": "one writer thread overlaps the merge already",
    "-v": "progress bars show the merge; --json prints a full report",
}


def _help() -> str:
    from ..merge import all_methods

    table = all_methods()
    lines = [f"{name} ({m.title})" for name, m in sorted(table.items())]
    return HELP_HEAD + "\nMethods: " + ", ".join(lines) + "."


def list_methods(json_out: bool) -> None:
    from ..merge import all_methods

    rows = [m.describe() for _, m in sorted(all_methods().items())]
    if json_out:
        print_json(rows)
        return
    for m in rows:
        base = {"required": "base required", "optional": "base optional", "none": "no base"}[m["base"]]
        console.print(f"[bold]{m['name']}[/]  {m['title']}  ({base}; {m['url']})", highlight=False)
        for p in m["params"]:
            extra = []
            if "choices" in p:
                extra.append("|".join(map(str, p["choices"])))
            if "range" in p:
                lo, hi = p["range"]
                extra.append(f"[{'-inf' if lo is None else lo}, {'inf' if hi is None else hi}]")
            if "mergekit_default" in p:
                extra.append(f"mergekit: {p['mergekit_default']}")
            console.print(f"    {p['name']:<14} {p['scope']:<6} {p['kind']:<5} default {p['default']!s:<9} "
                          f"{' '.join(extra)}  {p['help']}", highlight=False, soft_wrap=True)


def _refuse(ctx: typer.Context, param, value):
    if value:
        from ..errors import WeightsmithError

        name = param.opts[0]
        raise WeightsmithError(f"{name} (a mergekit-yaml option) has no meaning in weightsmith: "
                               f"{MERGEKIT_REFUSED[name]}")
    return value


def _refused_options():
    """Hidden options for mergekit-yaml flags that are refused by name when given."""
    return {name.lstrip("-").replace("-", "_"): Annotated[
        bool, typer.Option(name, hidden=True, callback=_refuse, expose_value=True)] for name in MERGEKIT_REFUSED}


def merge_cmd(
    recipe: Annotated[Path | None, typer.Argument(metavar="RECIPE", help="mergekit-style YAML recipe (optional when --method is given).")] = None,
    out_pos: Annotated[Path | None, typer.Argument(metavar="OUT", help="Output folder, as mergekit-yaml's second argument (or --out).")] = None,
    out: Annotated[Path | None, typer.Option("--out", "-o", help="Output folder (written atomically).")] = None,
    list_methods_: Annotated[bool, typer.Option("--list-methods", help="List the merge methods and their parameters, then exit.")] = False,
    method: Annotated[str | None, typer.Option("--method", help="Merge method (overrides the recipe's merge_method).")] = None,
    base: Annotated[str | None, typer.Option("--base", help="Base model folder (task vectors are taken against it).")] = None,
    model: Annotated[list[str] | None, typer.Option("--model", help="Input model folder; repeat per model.")] = None,
    weight: Annotated[list[float] | None, typer.Option("--weight", help="Weight: once for all models or once per --model. [default: 1.0]")] = None,
    density: Annotated[list[float] | None, typer.Option("--density", help="Fraction of each task vector kept (ties, dare_*, breadcrumbs*). [default: 1.0]")] = None,
    gamma: Annotated[list[float] | None, typer.Option("--gamma", help="Breadcrumbs: fraction of largest |delta| removed. [default: 0.01]")] = None,
    lambda_: Annotated[float | None, typer.Option("--lambda", help="Scale of the merged task vector. [default: 1.0]")] = None,
    t: Annotated[float | None, typer.Option("--t", help="SLERP position: 0 = base, 1 = the other model. [default: 0.5]")] = None,
    normalize: Annotated[bool | None, typer.Option("--normalize/--no-normalize", help="Divide by summed weights (default: per method, as mergekit).")] = None,
    rescale: Annotated[str | None, typer.Option("--rescale", help="DARE survivors: paper (1/density), l1 (mergekit) or none. [default: paper]")] = None,
    trim: Annotated[str | None, typer.Option("--trim", help="TIES: top --density of each whole task vector 'model' (paper) or of each 'tensor' (mergekit). [default: model]")] = None,
    mask: Annotated[str | None, typer.Option("--mask", help="Breadcrumbs mask fractions per 'row' (paper) or per 'tensor' (mergekit). [default: row]")] = None,
    compat: Annotated[str | None, typer.Option("--compat", help="'mergekit': mergekit's defaults and its arithmetic in the recipe's dtype. [default: paper]")] = None,
    filter_wise: Annotated[bool | None, typer.Option("--filter-wise/--no-filter-wise", help="Model stock: one ratio per output row. [default: no]")] = None,
    metric: Annotated[str | None, typer.Option("--metric", help="MWA: weight by 'loss' (1/loss) or 'step', read from trainer_state.json [default: loss]. PLeaS: activation similarity, euclidean or correlation [default: euclidean].")] = None,
    p: Annotated[float | None, typer.Option("--p", help="MWA penalty factor: w_i = m_i^p / sum_j m_j^p. [default: 1.0]")] = None,
    metric_value: Annotated[list[float] | None, typer.Option("--metric-value", help="MWA: loss or step per --model instead of trainer_state.json.")] = None,
    data: Annotated[str | None, typer.Option("--data", help="Greedy soup: held-out text scored by perplexity. PLeaS: calibration text.")] = None,
    width: Annotated[float | None, typer.Option("--width", help="PLeaS: output size in model widths, 1.0-2.0. [default: 1.2]")] = None,
    labelled: Annotated[str | None, typer.Option("--labelled", help="Greedy soup: held-out labelled file scored by accuracy.")] = None,
    max_tokens: Annotated[int | None, typer.Option("--max-tokens", help="Greedy soup: tokens of --data used. [default: all]")] = None,
    param: Annotated[list[str] | None, typer.Option("--param", help="Any other global parameter, KEY=VALUE (YAML value).")] = None,
    dtype: Annotated[str | None, typer.Option("--dtype", help="Output dtype float32/bfloat16/float16 (overrides the recipe's out_dtype/dtype). [default: recipe out_dtype, else dtype, else as input]")] = None,
    device: DeviceOpt = "auto",
    cuda: Annotated[bool | None, typer.Option("--cuda/--no-cuda", help="mergekit-yaml's spelling of --device cuda / --device cpu.")] = None,
    out_shard_size: Annotated[str, typer.Option("--out-shard-size", help="Largest output shard: parameters as mergekit (5B = 5 billion, 500M, 50K, or a bare count) or bytes (2GB, 500MB, 1GiB).")] = "5B",
    seed: SeedOpt = 0,
    random_seed: Annotated[int | None, typer.Option("--random-seed", help="mergekit-yaml's spelling of --seed.")] = None,
    num_threads: Annotated[int | None, typer.Option("--num-threads", "-j", min=1, help="CPU threads for the arithmetic. [default: torch's]")] = None,
    allow_crimes: Annotated[bool, typer.Option("--allow-crimes/--no-allow-crimes", help="Merge models whose configs disagree on architecture.")] = False,
    copy_tokenizer: Annotated[bool, typer.Option("--copy-tokenizer/--no-copy-tokenizer", help="Copy the tokenizer files to the output.")] = True,
    write_model_card: Annotated[bool, typer.Option("--write-model-card/--no-write-model-card", help="Write README.md describing the merge.")] = True,
    lazy_unpickle: Annotated[bool, typer.Option("--lazy-unpickle/--no-lazy-unpickle", help="Accepted from mergekit-yaml: reading is always lazy here (safetensors, mapped per tensor).")] = False,
    unsafe_truncate_embeddings: Annotated[bool, typer.Option("--unsafe-truncate-embeddings/--no-unsafe-truncate-embeddings", help="Accepted from mergekit-yaml: differing vocabulary rows are always cropped, with a note.")] = False,
    safe_serialization: Annotated[bool, typer.Option("--safe-serialization", help="Accepted from mergekit-yaml: the output is always safetensors.")] = True,
    async_write: Annotated[bool, typer.Option("--async-write/--no-async-write", help="Accepted from mergekit-yaml: writing always overlaps the merge.")] = False,
    allow_nonfinite: Annotated[bool, typer.Option("--allow-nonfinite", help="Merge inputs holding NaN/inf (reported per tensor) instead of refusing them.")] = False,
    force: ForceOpt = False,
    json_out: JsonOpt = False,
    quiet: QuietOpt = False,
    **refused,
) -> None:
    from ..errors import WeightsmithError
    from ..merge import load_recipe, merge
    from ..merge.recipe import parse_param, recipe_from_flags

    if list_methods_:
        list_methods(json_out)
        return
    if out is not None and out_pos is not None:
        raise WeightsmithError("give the output folder once: as the second argument or by --out")
    out = out or out_pos
    if out is None:
        raise WeightsmithError("no output folder: give --out DIR (or, as mergekit-yaml, RECIPE OUT)")
    if cuda is not None:
        if device != "auto":
            raise WeightsmithError("give --device or --cuda/--no-cuda, not both")
        device = "cuda" if cuda else "cpu"
    if random_seed is not None:
        seed = random_seed
    if num_threads is not None:
        import torch

        torch.set_num_threads(num_threads)
    flags = {"lambda": lambda_, "t": t, "normalize": normalize, "rescale": rescale, "trim": trim, "mask": mask, "compat": compat,
             "filter_wise": filter_wise, "metric": metric, "p": p, "data": data, "width": width, "labelled": labelled,
             "max_tokens": max_tokens, **dict(parse_param(x) for x in param or [])}
    per_model = {"weight": weight, "density": density, "gamma": gamma, "metric_value": metric_value}
    if recipe is not None:
        r = load_recipe(recipe)
        if model:
            raise WeightsmithError("give the models in the recipe or by --model, not both")
        r.method = method or r.method
        r.base_model = base or r.base_model
        r.parameters.update({k: v for k, v in flags.items() if v is not None})
        r.parameters.update({k: v[0] for k, v in per_model.items() if v and len(v) == 1})
        if any(v and len(v) > 1 for v in per_model.values()):
            raise WeightsmithError("with a recipe, per-model flags may be given once (applied to all models)")
    else:
        if method is None:
            raise WeightsmithError("give a recipe YAML or --method with --model flags")
        r = recipe_from_flags(method, model or [], base, per_model, flags)
    with progress_bars(not quiet) as progress:
        result = merge(r, out, device=device, dtype=dtype, out_shard_size=out_shard_size, seed=seed,
                       allow_crimes=allow_crimes, force=force, progress=progress,
                       copy_tokenizer=copy_tokenizer, model_card=write_model_card,
                       allow_nonfinite=allow_nonfinite)
    if json_out:
        print_json(result)
        return
    for row in result.get("trace", []):
        console.print(f"  {Path(row['ingredient']).name:<24} own {row['score']:.3f}  soup {row['soup_score']:.3f}  "
                      f"{'kept' if row['kept'] else 'skipped'}")
    for note in result.get("notes", []):
        console.print(f"  note: {note}")
    for row in result.get("nonfinite", []):
        console.print(f"  warning: {row['model']}: tensor {row['tensor']!r} holds {row['nonfinite']} NaN/inf value(s), "
                      "merged as they are", soft_wrap=True)
    console.print(f"merged {len(result.get('inputs', []))} inputs with {result.get('method')} -> {result.get('out', out)}"
                  + (f" ({result['tensors']} tensors, {result['seconds']:.1f} s)" if "tensors" in result else ""))


def _register() -> None:
    """Register ``merge`` with the refused mergekit-yaml options added as hidden keyword parameters."""
    import inspect
    import typing

    sig = inspect.signature(merge_cmd)
    hints = typing.get_type_hints(merge_cmd, include_extras=True)
    params = [q.replace(annotation=hints[q.name]) for q in sig.parameters.values()
              if q.kind is not inspect.Parameter.VAR_KEYWORD]
    params += [inspect.Parameter(name, inspect.Parameter.KEYWORD_ONLY, default=False, annotation=ann)
               for name, ann in _refused_options().items()]
    merge_cmd.__signature__ = sig.replace(parameters=params)
    app.command("merge", help=_help())(merge_cmd)


_register()
