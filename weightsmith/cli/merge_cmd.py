"""``weightsmith merge``: a mergekit-style YAML recipe, or the same merge described by flags.

The method list in the help and ``--list-methods`` come from the merge registry. mergekit-yaml's
options are accepted where they mean something here and refused by name otherwise.
"""
from __future__ import annotations

from pathlib import Path
from typing import Annotated, ClassVar

import typer

from . import app
from ..errors import OptionError, WeightsmithError
from ..options import Options, option
from ..stage_options import MergeOptions
from .common import RunFlags, console, print_json, progress_bars, styled
from .options import flag, spelled, with_options

HELP_HEAD = """Merge checkpoints into one, streaming one tensor at a time.

RECIPE is mergekit YAML (merge_method, base_model, models with per-model parameters, global parameters, dtype, out_dtype); parameter values may be layer gradients ([0.2, 0.8]) or filtered ([{filter: self_attn, value: 0.5}, {value: 0.2}]). Without RECIPE, give --method and --model flags. `weightsmith merge --list-methods` lists every method with its parameters (--json for a machine).

Arithmetic is float32 by default. --compat mergekit gives mergekit 0.1.5's choices where the paper and mergekit differ (TIES trims per tensor; DARE rescale l1; breadcrumbs masks per tensor) and does the arithmetic in the recipe's dtype as mergekit does, writing out_dtype when given.

Embedding / lm_head tensors whose vocabulary rows differ are cropped to the common first rows, as mergekit's truncation does; any other shape mismatch is an error. `slices:` (sources with layer_range) stacks layers; tokenizer_source / tokenizer: / chat_template build the output tokenizer and re-index the vocabulary rows as mergekit does.
"""

# mergekit-yaml options (mergekit 0.1.5 options.py) that mean nothing here: refused by name, with why.
MERGEKIT_REFUSED = {
    "--trust-remote-code": "weightsmith never runs code from a model folder",
    "--no-safe-serialization": "weightsmith writes safetensors only",
    "--clone-tensors": "weightsmith writes each tensor once; layer stacking copies what it needs",
    "--lora-merge-dtype": "an adapter is applied in the base's own dtype, as peft's merge_and_unload does",
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
        console.print(styled((m["name"], "bold"), f"  {m['title']}  ({base}; {m['url']})"), highlight=False)
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
        name = param.opts[0]
        raise WeightsmithError(f"{name} (a mergekit-yaml option) has no meaning in weightsmith: "
                               f"{MERGEKIT_REFUSED[name]}")
    return value


# mergekit-yaml's on/off flags among the refused ones: their --no- form asks for what weightsmith does anyway.
MERGEKIT_SWITCHES = ("--low-cpu-memory", "--clone-tensors", "--trust-remote-code", "--read-to-gpu", "--multi-gpu")


def _refused_options():
    """Hidden options for mergekit-yaml flags that are refused by name when given (their --no- forms accepted)."""
    def decl(name: str) -> str:
        return f"{name}/--no-{name[2:]}" if name in MERGEKIT_SWITCHES else name
    return {name.lstrip("-").replace("-", "_"): Annotated[
        bool, typer.Option(decl(name), hidden=True, callback=_refuse, expose_value=True)] for name in MERGEKIT_REFUSED}


RECIPE_FLAGS = {"base_model": "--base", "models": "--model", "merge_method": "--method"}  # recipe keys -> flags


METHOD_PANEL = "Method parameters (per method: --list-methods)"
MERGEKIT_PANEL = "mergekit-yaml spellings"


def _described(uses: list) -> str:
    """A method parameter's help from its declarations ``(method, Param)``: the wording most methods share, with
    those methods (the others' is in --list-methods), then the defaults, per method where they differ."""
    def names(ms: list[str]) -> str:
        return ", ".join(ms) if len(ms) < 4 else f"{len(ms)} methods"
    by_help: dict[str, list[str]] = {}
    by_default: dict[str, list[str]] = {}
    for method, p in uses:
        by_help.setdefault(p.help.rstrip("."), []).append(method)
        if p.default is not None:
            by_default.setdefault(str(p.default).lower(), []).append(method)
    wording, ms = max(by_help.items(), key=lambda kv: len(kv[1]))
    text = wording[:1].upper() + wording[1:] + f" ({names(ms)}" + ("; others: --list-methods)" if len(by_help) > 1
                                                                   else ")")
    if len(by_default) == 1 and len(next(iter(by_default.values()))) == len(uses):
        return f"{text}. (default {next(iter(by_default))})"
    parts = [f"{d} ({names(ms)})" for d, ms in sorted(by_default.items(), key=lambda kv: len(kv[1]))]
    return f"{text}." + (f" (default {'; '.join(parts)})" if parts else "")


class FixedFlags(Options):
    """The flags that describe a merge without a recipe (or change a recipe's method, base and parameters), and
    mergekit-yaml's spellings of other options. Command-line only: a pipeline gives these as the merge stage's
    ``method``, ``base_model``, ``parameters`` and ``model_parameters``. ``MergeFlags`` adds one flag per method
    parameter the registry declares."""
    method: str | None = option(None, pipeline=False, help="Merge method (overrides the recipe's merge_method).")
    base: str | None = option(None, pipeline=False, help="Base model folder (task vectors are taken against it).")
    model: list[str] | None = option(None, pipeline=False, metavar="MODEL",
                                     help="Input model folder; repeat per model.")
    param: list[str] | None = option(None, pipeline=False, metavar="KEY=VALUE", panel=METHOD_PANEL,
                                     help="Any method parameter, KEY=VALUE (YAML value).")
    cuda: bool | None = option(None, pipeline=False, flag="--cuda/--no-cuda", panel=MERGEKIT_PANEL,
                               help="--device cuda / --device cpu.")
    random_seed: int | None = option(None, pipeline=False, panel=MERGEKIT_PANEL, metavar="INT", help="--seed.")
    num_threads: int | None = option(None, lo=1, pipeline=False, short="-j", metavar="INT", panel=MERGEKIT_PANEL,
                                     help="CPU threads for the arithmetic. [default: torch's]")
    lazy_unpickle: bool = option(False, pipeline=False, flag="--lazy-unpickle/--no-lazy-unpickle",
                                 panel=MERGEKIT_PANEL, help="Accepted: reading is always lazy here (safetensors, "
                                                            "mapped per tensor).")
    unsafe_truncate_embeddings: bool = option(
        False, pipeline=False, flag="--unsafe-truncate-embeddings/--no-unsafe-truncate-embeddings",
        panel=MERGEKIT_PANEL, help="Accepted: differing vocabulary rows are always cropped, with a note.")
    safe_serialization: bool = option(False, pipeline=False, panel=MERGEKIT_PANEL,
                                      help="Accepted: the output is always safetensors.")
    async_write: bool = option(False, pipeline=False, flag="--async-write/--no-async-write", panel=MERGEKIT_PANEL,
                               help="Accepted: writing always overlaps the merge.")

    PER_MODEL: ClassVar[tuple[str, ...]] = ()  # method parameters given once or once per --model (field names)
    GLOBAL: ClassVar[tuple[str, ...]] = ()

    def per_model(self) -> dict[str, list | None]:
        return {_param(k): getattr(self, k) for k in self.PER_MODEL}

    def parameters(self) -> dict:
        """The global method parameters the flags give (``--param`` ones included; None: not given)."""
        from ..merge.recipe import parse_param

        return {**{_param(k): getattr(self, k) for k in self.GLOBAL}, **dict(parse_param(x) for x in self.param or [])}

    def flag_of(self, param: str) -> str | None:
        """The flag that gave method parameter ``param`` on this command line, if one did."""
        if param in {x.partition("=")[0].strip() for x in self.param or []}:
            return f"--param {param}"
        field = _field(param)
        if field in (*self.PER_MODEL, *self.GLOBAL) and getattr(self, field) not in (None, []):
            return flag(param)
        return None


def _field(param: str) -> str:
    return param + "_" if param == "lambda" else param  # a Python keyword as a field name


def _param(field: str) -> str:
    return field.removesuffix("_") if field == "lambda_" else field


def _method_flags() -> type[FixedFlags]:
    """``FixedFlags`` with one flag per parameter name the registry declares: repeatable (once, or once per
    --model) where some method takes it per model; help and defaults from the declarations."""
    from ..merge import all_methods

    uses: dict[str, list] = {}
    for name, method in sorted(all_methods().items()):
        for p in method.params:
            uses.setdefault(p.name, []).append((name, p))
    annotations, namespace, per_model = {}, {}, []
    for name, declared in sorted(uses.items()):
        kind = declared[0][1].kind
        if any(p.kind is not kind for _, p in declared):
            raise TypeError(f"merge parameter {name!r} is declared with different kinds")
        field = _field(name)
        if field in FixedFlags.specs() or field in MergeOptions.specs():
            raise TypeError(f"merge parameter {name!r} has the name of a merge option")
        many = any(p.scope == "model" for _, p in declared)
        per_model += [field] * many
        annotations[field] = (list[kind] if many else kind) | None
        spelled_as = flag(name) + (f"/--no-{flag(name)[2:]}" if kind is bool else "")
        namespace[field] = option(None, pipeline=False, flag=spelled_as, panel=METHOD_PANEL, help=_described(declared),
                                  metavar=kind.__name__.upper().replace("STR", "TEXT"))
    namespace.update(__annotations__=annotations, __doc__=FixedFlags.__doc__, PER_MODEL=tuple(per_model),
                     GLOBAL=tuple(f for f in annotations if f not in per_model))
    return type("MergeFlags", (FixedFlags,), namespace)


MergeFlags = _method_flags()


@with_options(RunFlags, "run", only=("device", "seed", "force", "json_out", "quiet", "offline"))
@with_options(MergeOptions, "opts")
@with_options(MergeFlags, "flags")
def merge_cmd(
    recipe: Annotated[Path | None, typer.Argument(metavar="RECIPE", help="mergekit-style YAML recipe (optional when --method is given).")] = None,
    out_pos: Annotated[Path | None, typer.Argument(metavar="OUT", help="Output folder, as mergekit-yaml's second argument (or --out).")] = None,
    out: Annotated[Path | None, typer.Option("--out", "-o", help="Output folder (written atomically).")] = None,
    list_methods_: Annotated[bool, typer.Option("--list-methods", help="List the merge methods and their parameters, then exit.")] = False,
    transformers_cache: Annotated[Path | None, typer.Option("--transformers-cache", help="Hugging Face cache folder for Hub model names (as HF_HUB_CACHE).")] = None,
    lora_merge_cache: Annotated[Path | None, typer.Option("--lora-merge-cache", help="Folder for bases with adapters applied (model+adapter references).")] = None,
    loud: Annotated[bool, typer.Option("--no-quiet", hidden=True, help="mergekit-yaml's default; accepted.")] = False,
    flags: MergeFlags = None,
    opts: MergeOptions = None,
    run: RunFlags = None,
    **refused,
) -> None:
    from ..merge import merge

    if list_methods_:
        list_methods(run.json_out)
        return
    out = _output(out, out_pos)
    _caches(transformers_cache, lora_merge_cache, run.offline)
    device = _device(run.device, flags.cuda)
    seed = run.seed if flags.random_seed is None else flags.random_seed
    if flags.num_threads is not None:
        import torch

        torch.set_num_threads(flags.num_threads)
    r = _recipe(recipe, flags)
    try:
        with progress_bars(not run.quiet) as progress:
            result = merge(r, out, opts, device=device, seed=seed, force=run.force, progress=progress)
    except OptionError as exc:
        raise _flag_wording(exc, flags, recipe is not None) from None
    if run.json_out:
        print_json(result)
        return
    _print(result, out)


def _output(out: Path | None, out_pos: Path | None) -> Path:
    if out is not None and out_pos is not None:
        raise WeightsmithError("give the output folder once: as the second argument or by --out")
    if out is None and out_pos is None:
        raise WeightsmithError("no output folder: give --out DIR (or, as mergekit-yaml, RECIPE OUT)")
    return out or out_pos


def _caches(transformers_cache: Path | None, lora_merge_cache: Path | None, offline: bool) -> None:
    """mergekit-yaml's cache flags and --offline, as the environment variables the resolver reads."""
    import os

    from .common import go_offline

    go_offline(offline)
    if transformers_cache is not None:
        os.environ["HF_HUB_CACHE"] = str(transformers_cache)
    if lora_merge_cache is not None:
        os.environ["WEIGHTSMITH_ADAPTERS_CACHE"] = str(lora_merge_cache)


def _device(device: str, cuda: bool | None) -> str:
    if cuda is None:
        return device
    if device != "auto":
        raise WeightsmithError("give --device or --cuda/--no-cuda, not both")
    return "cuda" if cuda else "cpu"


def _recipe(path: Path | None, flags: MergeFlags):
    """The recipe file with the flags' method, base and parameters over it, or the recipe the flags describe."""
    from ..merge import load_recipe
    from ..merge.recipe import _ref_text, recipe_from_flags

    try:
        per_model, params = flags.per_model(), flags.parameters()
        if path is None:
            if flags.method is None:
                raise WeightsmithError("give a recipe YAML or --method with --model flags")
            return recipe_from_flags(flags.method, flags.model or [], flags.base, per_model, params)
        r = load_recipe(path)
        if flags.model:
            raise WeightsmithError("give the models in the recipe or by --model, not both")
        if any(v and len(v) > 1 for v in per_model.values()):
            raise WeightsmithError("with a recipe, per-model flags may be given once (applied to all models)")
        r.method = flags.method or r.method
        r.base_model = _ref_text(str(flags.base), "base_model") if flags.base else r.base_model
        given = {**{k: v for k, v in params.items() if v is not None}, **{k: v[0] for k, v in per_model.items() if v}}
        _check_given(r.method, given)
        r.parameters.update(given)
        return r
    except OptionError as exc:
        raise _flag_wording(exc, flags, False) from None


def _check_given(method_name: str, given: dict) -> None:
    """The values flags put over a recipe file, checked here: an error the merge raises later is the file's."""
    from ..merge.registry import get_method, resolve

    method = get_method(method_name)
    for key, value in given.items():
        if method.param(key) is not None:
            resolve(method.param(key), value, "", 0.0, "command line", None, True)


def _flag_wording(exc: OptionError, flags: MergeFlags, from_file: bool) -> WeightsmithError:
    """A bad value the command line gave is worded as its flag; one a recipe file gave (``from_file``) keeps the
    recipe's wording (where in the file, and the parameter's name there). Options a message suggests are flags."""
    if exc.param is not None and from_file and exc.param not in MergeOptions.specs():
        return WeightsmithError(str(exc))
    return WeightsmithError(exc.render(lambda p: flags.flag_of(p) or RECIPE_FLAGS.get(p) or spelled(p, MergeOptions)))


def _print(result: dict, out: Path) -> None:
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
