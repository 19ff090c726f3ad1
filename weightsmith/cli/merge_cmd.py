"""``weightsmith merge``: a mergekit-style YAML recipe, or the same merge described by flags."""
from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from . import app
from .common import DeviceOpt, ForceOpt, JsonOpt, OutOpt, QuietOpt, SeedOpt, ShardOpt, console, print_json, progress_bars

HELP = """Merge checkpoints into one, streaming one tensor at a time.

RECIPE is mergekit YAML (merge_method, base_model, models with per-model parameters, global
parameters, dtype); parameter values may be layer gradients ([0.2, 0.8]) or filtered
([{filter: self_attn, value: 0.5}, {value: 0.2}]). Without RECIPE, give --method and --model flags.

Methods: linear, task_arithmetic, ties, dare_linear, dare_ties, breadcrumbs, breadcrumbs_ties,
slerp, model_stock, mwa, greedy_soup. Where the paper and mergekit differ, the paper is the
default and --compat mergekit gives mergekit's choice (TIES trims per tensor; DARE rescale l1;
breadcrumbs masks per tensor).
Embedding / lm_head tensors whose vocabulary rows differ are cropped to the common first rows,
as mergekit's truncation does; any other shape mismatch is an error.
"""


@app.command("merge", help=HELP)
def merge_cmd(
    recipe: Annotated[Path | None, typer.Argument(help="mergekit-style YAML recipe (optional when --method is given).")] = None,
    out: OutOpt = ...,
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
    compat: Annotated[str | None, typer.Option("--compat", help="'mergekit' switches defaults to mergekit's choices. [default: paper]")] = None,
    filter_wise: Annotated[bool | None, typer.Option("--filter-wise/--no-filter-wise", help="Model stock: one ratio per output row. [default: no]")] = None,
    metric: Annotated[str | None, typer.Option("--metric", help="MWA: weight by 'loss' (1/loss) or 'step', read from trainer_state.json [default: loss]. PLeaS: activation similarity, euclidean or correlation [default: euclidean].")] = None,
    p: Annotated[float | None, typer.Option("--p", help="MWA penalty factor: w_i = m_i^p / sum_j m_j^p. [default: 1.0]")] = None,
    metric_value: Annotated[list[float] | None, typer.Option("--metric-value", help="MWA: loss or step per --model instead of trainer_state.json.")] = None,
    data: Annotated[str | None, typer.Option("--data", help="Greedy soup: held-out text scored by perplexity. PLeaS: calibration text.")] = None,
    width: Annotated[float | None, typer.Option("--width", help="PLeaS: output size in model widths, 1.0-2.0. [default: 1.2]")] = None,
    labelled: Annotated[str | None, typer.Option("--labelled", help="Greedy soup: held-out labelled file scored by accuracy.")] = None,
    max_tokens: Annotated[int | None, typer.Option("--max-tokens", help="Greedy soup: tokens of --data used. [default: all]")] = None,
    param: Annotated[list[str] | None, typer.Option("--param", help="Any other global parameter, KEY=VALUE (YAML value).")] = None,
    dtype: Annotated[str | None, typer.Option("--dtype", help="Output dtype float32/bfloat16/float16; math is float32. [default: recipe dtype, else as input]")] = None,
    device: DeviceOpt = "auto",
    out_shard_size: ShardOpt = "5GB",
    seed: SeedOpt = 0,
    allow_crimes: Annotated[bool, typer.Option("--allow-crimes", help="Merge models whose configs disagree on architecture.")] = False,
    allow_nonfinite: Annotated[bool, typer.Option("--allow-nonfinite", help="Merge inputs holding NaN/inf (reported per tensor) instead of refusing them.")] = False,
    force: ForceOpt = False,
    json_out: JsonOpt = False,
    quiet: QuietOpt = False,
) -> None:
    from ..errors import WeightsmithError
    from ..merge import load_recipe, merge
    from ..merge.recipe import parse_param, recipe_from_flags

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
