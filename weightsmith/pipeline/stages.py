"""Stage registry: YAML stage name -> adapter. An adapter's keyword-only parameters are the YAML ``params``
schema (names, defaults, types); its body calls one library function and returns a small JSON-able summary.
"""
from __future__ import annotations

import functools
import inspect
import json
import types
import typing
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from ..errors import OptionError, WeightsmithError, reworded
from ..options import Options
from ..progress import ProgressFn
from .. import stage_options as so


@dataclass
class Context:
    """What a stage gets besides its parameters."""
    inputs: list[Path]
    out: Path
    device: str = "auto"
    seed: int = 0
    force: bool = False
    progress: ProgressFn | None = None
    recipe: str | None = None
    dry_run: bool = False  # validate only: the stage stops at its output check (run --dry-run)


@dataclass(frozen=True)
class StageDef:
    name: str
    fn: Callable[..., dict]
    min_inputs: int = 1
    max_inputs: int | None = 1
    writes_model: bool = True
    dry: bool | None = None  # its function stops at check_output before any heavy work (default: writes_model)
    paths: tuple[str, ...] = ()  # parameters naming files or folders that must exist
    check: Callable[[dict, list[str]], None] | None = None  # deeper validation before any stage runs
    options: type[Options] | None = None  # the stage's options class: its params schema, instead of fn's keywords

    @property
    def validates_dry(self) -> bool:
        return self.writes_model if self.dry is None else self.dry

    def parameters(self) -> dict[str, inspect.Parameter]:
        if self.options is not None:
            return {n: inspect.Parameter(n, inspect.Parameter.KEYWORD_ONLY, default=inspect.Parameter.empty
                                         if n in self.options.required() else self.options.default(n))
                    for n, s in self.options.specs().items() if s.pipeline}
        return {n: p for n, p in inspect.signature(self.fn).parameters.items() if p.kind is p.KEYWORD_ONLY}

    def hints(self) -> dict:
        return self.options.hints() if self.options is not None else typing.get_type_hints(self.fn)

    def check_options(self, params: dict, where: str) -> None:
        """Validate ``params`` against the options class (ranges, choices, rules across options)."""
        if self.options is not None:
            try:
                self.options.from_params(params)
            except OptionError as exc:
                raise params_wording(exc, self.options, where) from None


STAGES: dict[str, StageDef] = {}


def stage(name: str, **options) -> Callable:
    def register(fn: Callable) -> Callable:
        if options.get("options") is not None:  # an options class names its path parameters itself
            options.setdefault("paths", tuple(n for n, s in options["options"].specs().items() if s.path))
            fn = _params_wording(fn, options["options"])
        STAGES[name] = StageDef(name, fn, **options)
        return fn
    return register


def params_wording(exc: OptionError, cls: type[Options], where: str = "") -> WeightsmithError:
    """An option error worded for a pipeline: ``stage 'x', key 'params.y': ...`` (``where`` is the stage part).
    Options that are not the stage's params (``trust_remote_code``) are left for the command line to word."""
    def name(p: str) -> str | None:
        return f"params.{p}" if p in cls.specs() else None

    key = f"key 'params.{exc.param}'" if exc.param in cls.specs() else None
    subject = ", ".join(x for x in (where, key) if x) if key else None
    return reworded(exc, name, subject, prefix=f"{where}: " if where and not key else "")


def _params_wording(fn: Callable, cls: type[Options]) -> Callable:
    """Reword an option error raised while the stage runs as its YAML key (``key 'params.context': ...``)."""
    @functools.wraps(fn)
    def run(ctx: Context, **params):
        try:
            return fn(ctx, **params)
        except OptionError as exc:
            raise params_wording(exc, cls) from None
    return run


def accepts(annotation, value) -> bool:
    """Whether a YAML value fits a parameter annotation (int, float, str, bool, Path, list, dict, unions)."""
    origin = typing.get_origin(annotation)
    if origin in (typing.Union, types.UnionType):
        return any(accepts(a, value) for a in typing.get_args(annotation))
    if annotation is type(None):
        return value is None
    if annotation is typing.Any:
        return True
    if annotation is bool:
        return isinstance(value, bool)
    if annotation is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if annotation is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if annotation in (str, Path):
        return isinstance(value, str)
    if origin is list or annotation is list:
        args = typing.get_args(annotation)
        return isinstance(value, list) and (not args or all(accepts(args[0], v) for v in value))
    if origin is dict or annotation is dict:
        return isinstance(value, dict)
    return True


def _write_json(folder: Path, name: str, data) -> None:
    (folder / name).write_text(json.dumps(data, indent=2, default=str))


# -- stages available with the foundation --------------------------------------------------------

@stage("inspect", writes_model=False)
def inspect_stage(ctx: Context) -> dict:
    from ..inspect import summarize

    info = summarize(ctx.inputs[0])
    _write_json(ctx.out, "inspect.json", info)
    return {"params": info["params"], "unique_params": info.get("unique_params", info["params"]),
            "size_bytes": info["size_on_disk"], "format": info["format"], "layers": info["layers"]}


@stage("eval", max_inputs=None, writes_model=False, options=so.EvalOptions)
def eval_stage(ctx: Context, **params) -> dict:
    from ..eval import evaluate

    opts = so.EvalOptions.from_params(params)
    rows = evaluate(ctx.inputs, opts, device=ctx.device, progress=ctx.progress)
    rows = [{**r.to_dict(), "data": Path(opts.data).name if opts.data else None,
             "labelled": Path(opts.labelled).name if opts.labelled else None} for r in rows]
    _write_json(ctx.out, "eval.json", rows)
    return {"rows": rows}


@stage("export", options=so.ExportOptions)
def export_stage(ctx: Context, **params) -> dict:
    from ..export import export

    return _scalars(export(ctx.inputs[0], ctx.out, so.ExportOptions.from_params(params), force=ctx.force,
                           progress=ctx.progress))


def _check_push(params: dict, inputs: list[str]) -> None:
    from ..checkpoint.hub import check_repo_id, check_timeout

    check_repo_id(str(params.get("repo_id", "")))
    check_timeout(params.get("timeout", 60.0))


@stage("push", writes_model=False, check=_check_push)
def push_stage(ctx: Context, *, repo_id: str, private: bool = False, revision: str | None = None,
               dry_run: bool = False, message: str | None = None, timeout: float = 60.0,
               weightsmith_format: bool = False) -> dict:
    from ..checkpoint.hub import push

    result = push(ctx.inputs[0], repo_id, private=private, revision=revision, dry_run=dry_run,
                  commit_message=message, timeout=timeout, progress=ctx.progress, weightsmith_format=weightsmith_format)
    _write_json(ctx.out, "push.json", result)
    return {k: result.get(k) for k in ("repo_id", "revision", "dry_run", "total_bytes", "commit", "commit_url")}



# -- stages built on the merge, fold and compress packages -----------------------------------------

def _recipe(inputs: list[Path], o: so.MergeStageOptions):
    """The recipe a merge stage's params describe, built directly (the stage's inputs are its models)."""
    from ..merge.recipe import ModelEntry, Recipe

    per_model = o.model_parameters or [{} for _ in inputs]
    if len(per_model) != len(inputs):
        raise WeightsmithError(f"params.model_parameters has {len(per_model)} entries for {len(inputs)} inputs")
    return Recipe(o.method, [ModelEntry(str(p), dict(m)) for p, m in zip(inputs, per_model)],
                  str(o.base_model) if o.base_model else None, dict(o.parameters or {}), o.dtype)


def _check_merge(params: dict, inputs: list[str]) -> None:
    from ..merge import get_method

    o = so.MergeStageOptions.from_params(params)
    get_method(o.method)
    _recipe([Path(p) for p in inputs], o)


def _method_param_wording(exc: OptionError, o: so.MergeStageOptions, inputs: list[Path]) -> str:
    """A merge parameter's bad value named by the params key that gave it (``params.parameters.density``, or
    ``params.model_parameters[1].density`` for the input the error is about)."""
    name = exc.param
    given = [i for i, m in enumerate(o.model_parameters or []) if name in m]
    if name in (o.parameters or {}) or not given:
        key = f"params.parameters.{name}"
    else:
        at = [i for i in given if exc.where and f"model {inputs[i]}:" in exc.where + ":"]
        key = f"params.model_parameters[{(at or given)[0]}].{name}"
    return exc.render(lambda p: f"params.parameters.{p}", subject=f"key {key!r}")


@stage("merge", max_inputs=None, options=so.MergeStageOptions, check=_check_merge)
def merge_stage(ctx: Context, **params) -> dict:
    """mergekit-style merge of the inputs: ``method``, ``parameters`` and ``model_parameters`` as in a mergekit
    recipe (a whole-model method's data, e.g. greedy soup's held-out set, is one of its parameters)."""
    from ..merge import get_method, merge

    o = so.MergeStageOptions.from_params(params)
    recipe = _recipe(ctx.inputs, o)
    try:
        info = merge(recipe, ctx.out, o.run_options(), device=ctx.device, seed=ctx.seed, force=ctx.force,
                     progress=ctx.progress)
    except OptionError as exc:
        specs = so.MergeStageOptions.specs()
        if exc.param in specs:
            raise  # a stage option: worded by the stage's own wrapper
        if exc.param is None:  # a fix that names options: the stage's, or the method's parameters
            method = get_method(o.method)
            raise reworded(exc, lambda p: f"params.{p}" if p in specs else f"params.parameters.{p}"
                           if method.param(p) is not None else None) from None
        raise WeightsmithError(_method_param_wording(exc, o, ctx.inputs)) from None
    return {"method": o.method, "seconds": info.get("seconds")} if isinstance(info, dict) else {"method": o.method}


@stage("fold", options=so.FoldOptions)
def fold_stage(ctx: Context, **params) -> dict:
    from ..fold.stage import fold

    info = fold(ctx.inputs[0], ctx.out, so.FoldOptions.from_params(params), seed=ctx.seed, device=ctx.device,
                force=ctx.force, progress=ctx.progress)
    return {k: v for k, v in info.items() if isinstance(v, (int, float, str, list))} if isinstance(info, dict) else {}


def _scalars(info) -> dict:
    return {k: v for k, v in info.items() if isinstance(v, (int, float, str))} if isinstance(info, dict) else {}


@stage("analyze", writes_model=False, dry=True, options=so.AnalyzeOptions)
def analyze_stage(ctx: Context, **params) -> dict:
    from ..fold.analyze import analyze, write_analysis

    o = so.AnalyzeOptions.from_params(params)
    info = analyze(ctx.inputs[0], ctx.out if ctx.dry_run else None, o, device=ctx.device, force=True,
                   progress=ctx.progress)
    write_analysis(info, ctx.out)  # ctx.out is the runner's temporary folder
    return _scalars(info)


@stage("compress", options=so.RpsOptions)
def compress_stage(ctx: Context, **params) -> dict:
    """RPS compression (ROAST / STABLE-RPS hashed memory) of the input, optionally healed on ``data``."""
    from ..compressor.rps import compress_rps

    return _scalars(compress_rps(ctx.inputs[0], ctx.out, so.RpsOptions.from_params(params), device=ctx.device,
                                 seed=ctx.seed, force=ctx.force, progress=ctx.progress))


@stage("align", min_inputs=2, max_inputs=2, options=so.AlignOptions)
def align_stage(ctx: Context, **params) -> dict:
    """Permute the second input into the first one's basis (same function as the second input)."""
    from ..merge.align.folders import align

    return _scalars(align(ctx.inputs[0], ctx.inputs[1], ctx.out, so.AlignOptions.from_params(params), seed=ctx.seed,
                          device=ctx.device, force=ctx.force, progress=ctx.progress))
