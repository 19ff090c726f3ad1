"""Stage registry: YAML stage name -> adapter. An adapter's keyword-only parameters are the YAML ``params``
schema (names, defaults, types); its body calls one library function and returns a small JSON-able summary.
"""
from __future__ import annotations

import inspect
import json
import types
import typing
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from ..errors import WeightsmithError
from ..progress import ProgressFn


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

    @property
    def validates_dry(self) -> bool:
        return self.writes_model if self.dry is None else self.dry

    def parameters(self) -> dict[str, inspect.Parameter]:
        return {n: p for n, p in inspect.signature(self.fn).parameters.items() if p.kind is p.KEYWORD_ONLY}

    def hints(self) -> dict:
        return typing.get_type_hints(self.fn)


STAGES: dict[str, StageDef] = {}


def stage(name: str, **options) -> Callable:
    def register(fn: Callable) -> Callable:
        STAGES[name] = StageDef(name, fn, **options)
        return fn
    return register


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
    from ..checkpoint.inspect import summarize

    info = summarize(ctx.inputs[0])
    _write_json(ctx.out, "inspect.json", info)
    return {"params": info["params"], "unique_params": info.get("unique_params", info["params"]),
            "size_bytes": info["size_on_disk"], "format": info["format"], "layers": info["layers"]}


def _check_eval(params: dict, inputs: list[str]) -> None:
    if params.get("data") is None and params.get("labelled") is None:
        raise WeightsmithError("nothing to measure: set params.data (perplexity) and/or params.labelled (accuracy)")


@stage("eval", max_inputs=None, writes_model=False, paths=("data", "labelled", "tokenizer"), check=_check_eval)
def eval_stage(ctx: Context, *, data: Path | None = None, labelled: Path | None = None,
               tokenizer: Path | None = None, context: int | None = None, stride: int | None = None,
               max_tokens: int | None = None, batch_size: int = 8, dtype: str | None = None) -> dict:
    from ..eval import evaluate

    rows = evaluate(ctx.inputs, data=data, labelled=labelled, tokenizer=tokenizer, context=context, stride=stride,
                    max_tokens=max_tokens, batch_size=batch_size, device=ctx.device, dtype=dtype,
                    progress=ctx.progress)
    rows = [{**r.to_dict(), "data": Path(data).name if data else None,
             "labelled": Path(labelled).name if labelled else None} for r in rows]
    _write_json(ctx.out, "eval.json", rows)
    return {"rows": rows}


@stage("export")
def export_stage(ctx: Context, *, out_shard_size: str = "5GB") -> dict:
    from ..loading import folder_format, format_module

    fmt = folder_format(ctx.inputs[0])
    if fmt == "plain":
        raise WeightsmithError(f"{ctx.inputs[0]} is already a plain checkpoint; export turns folded or RPS folders "
                               "into plain ones")
    info = format_module(fmt).export_plain(ctx.inputs[0], ctx.out, max_shard_size=out_shard_size, force=ctx.force,
                                           progress=ctx.progress)
    return {"format": fmt, **({k: v for k, v in info.items() if isinstance(v, (int, float, str))}
                              if isinstance(info, dict) else {})}


def _check_push(params: dict, inputs: list[str]) -> None:
    from ..checkpoint.hub import check_repo_id, check_timeout

    check_repo_id(str(params.get("repo_id", "")))
    check_timeout(params.get("timeout", 60.0))


@stage("push", writes_model=False, check=_check_push)
def push_stage(ctx: Context, *, repo_id: str, private: bool = False, revision: str | None = None,
               dry_run: bool = False, message: str | None = None, timeout: float = 60.0) -> dict:
    from ..checkpoint.hub import push

    result = push(ctx.inputs[0], repo_id, private=private, revision=revision, dry_run=dry_run,
                  commit_message=message, timeout=timeout, progress=ctx.progress)
    _write_json(ctx.out, "push.json", result)
    return {k: result.get(k) for k in ("repo_id", "revision", "dry_run", "total_bytes", "commit", "commit_url")}



# -- stages built on the merge, fold and compress packages -----------------------------------------

def _recipe(inputs: list[Path], method: str, base_model: str | None, parameters: dict,
            model_parameters: list[dict] | None, dtype: str | None):
    from ..merge import parse_recipe
    import yaml

    per_model = model_parameters or [{} for _ in inputs]
    if len(per_model) != len(inputs):
        raise WeightsmithError(f"params.model_parameters has {len(per_model)} entries for {len(inputs)} inputs")
    doc = {"merge_method": method, "models": [{"model": str(p), **({"parameters": m} if m else {})}
                                              for p, m in zip(inputs, per_model)]}
    if base_model:
        doc["base_model"] = str(base_model)
    if parameters:
        doc["parameters"] = parameters
    if dtype:
        doc["dtype"] = dtype
    return parse_recipe(yaml.safe_dump(doc, sort_keys=False), "params")


def _check_merge(params: dict, inputs: list[str]) -> None:
    from ..merge import get_method

    get_method(params.get("method", ""))
    _recipe([Path(p) for p in inputs], params["method"], params.get("base_model"), params.get("parameters") or {},
            params.get("model_parameters"), params.get("dtype"))


@stage("merge", max_inputs=None, paths=("base_model",), check=_check_merge)
def merge_stage(ctx: Context, *, method: str, base_model: Path | None = None, parameters: dict | None = None,
                model_parameters: list[dict] | None = None, dtype: str | None = None, out_shard_size: str = "5GB",
                allow_crimes: bool = False, options: dict | None = None) -> dict:
    """mergekit-style merge of the inputs: ``method`` and ``parameters`` as in a mergekit recipe;
    ``options`` go to whole-model methods (e.g. data for greedy soup)."""
    from ..merge import merge

    recipe = _recipe(ctx.inputs, method, base_model, parameters or {}, model_parameters, dtype)
    info = merge(recipe, ctx.out, device=ctx.device, dtype=dtype, out_shard_size=out_shard_size, seed=ctx.seed,
                 allow_crimes=allow_crimes, force=ctx.force, progress=ctx.progress, **(options or {}))
    return {"method": method, "seconds": info.get("seconds")} if isinstance(info, dict) else {"method": method}


@stage("fold", paths=("data",))
def fold_stage(ctx: Context, *, data: Path, remove: float = 0.25, share: str = "1", share_init: str = "average",
               importance: str = "loss", relax_rank: int = 0, heal_steps: int = 0, heal_lr: float = 3e-4,
               heal_tail: int = 2, heal_lora: int = 0, gate_steps: int = 200, seq: int | None = None,
               max_tokens: int = 16384, batch_size: int = 8, out_shard_size: str = "5GB") -> dict:
    from ..fold.stage import fold

    info = fold(ctx.inputs[0], ctx.out, data=data, remove=remove, share=str(share), share_init=share_init,
                importance=importance, relax_rank=relax_rank, heal_steps=heal_steps, heal_lr=heal_lr,
                heal_tail=heal_tail, heal_lora=heal_lora, gate_steps=gate_steps, seq=seq, max_tokens=max_tokens, batch_size=batch_size,
                seed=ctx.seed, device=ctx.device, max_shard_size=out_shard_size, force=ctx.force,
                progress=ctx.progress)
    return {k: v for k, v in info.items() if isinstance(v, (int, float, str, list))} if isinstance(info, dict) else {}


@stage("analyze", writes_model=False, dry=True, paths=("data", "tokenizer"))
def analyze_stage(ctx: Context, *, data: Path, remove: float = 0.25, seq: int | None = None, max_tokens: int = 4096,
                  batch_size: int = 8, tokenizer: Path | None = None) -> dict:
    from ..fold.analyze import analyze, write_analysis

    info = analyze(ctx.inputs[0], data, ctx.out if ctx.dry_run else None, remove=remove, seq=seq,
                   max_tokens=max_tokens, batch_size=batch_size, device=ctx.device, tokenizer=tokenizer,
                   force=True, progress=ctx.progress)
    write_analysis(info, ctx.out)  # ctx.out is the runner's temporary folder
    return {k: v for k, v in info.items() if isinstance(v, (int, float, str))} if isinstance(info, dict) else {}


@stage("compress", paths=("data",))
def compress_stage(ctx: Context, *, budget: float = 0.1, mapping: str = "stable", modules: str | None = None,
                   sharing: str = "global", tile: int = 64, heal_steps: int = 0, data: Path | None = None,
                   lr: float = 1e-3, batch: int = 16, seq: int = 64) -> dict:
    """RPS compression (ROAST / STABLE-RPS hashed memory) of the input, optionally healed on ``data``."""
    from ..compressor.rps import compress_rps

    info = compress_rps(ctx.inputs[0], ctx.out, budget=budget, mapping=mapping, modules=modules, sharing=sharing,
                        tile=tile, heal_steps=heal_steps, data=data, lr=lr, batch=batch, seq=seq, device=ctx.device,
                        seed=ctx.seed, force=ctx.force, progress=ctx.progress)
    return {k: v for k, v in info.items() if isinstance(v, (int, float, str))} if isinstance(info, dict) else {}


def _check_align(params: dict, inputs: list[str]) -> None:
    if params.get("method", "weight") == "activation" and not params.get("data"):
        raise WeightsmithError("params.data: activation matching needs calibration text")


@stage("align", min_inputs=2, max_inputs=2, paths=("data",), check=_check_align)
def align_stage(ctx: Context, *, method: str = "weight", data: Path | None = None, metric: str = "euclidean",
                max_tokens: int = 8192, seq_len: int = 128, batch_size: int = 8,
                out_shard_size: str = "5GB") -> dict:
    """Permute the second input into the first one's basis (same function as the second input)."""
    from ..merge.align.folders import align

    info = align(ctx.inputs[0], ctx.inputs[1], ctx.out, method=method, data=data, metric=metric,
                 max_tokens=max_tokens, seq_len=seq_len, batch_size=batch_size, seed=ctx.seed, device=ctx.device,
                 force=ctx.force, max_shard_size=out_shard_size, progress=ctx.progress)
    return {k: v for k, v in info.items() if isinstance(v, (int, float, str))} if isinstance(info, dict) else {}
