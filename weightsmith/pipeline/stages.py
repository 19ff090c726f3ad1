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


@dataclass(frozen=True)
class StageDef:
    name: str
    fn: Callable[..., dict]
    min_inputs: int = 1
    max_inputs: int | None = 1
    writes_model: bool = True
    paths: tuple[str, ...] = ()  # parameters naming files or folders that must exist
    check: Callable[[dict, list[str]], None] | None = None  # deeper validation before any stage runs

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
    from ..checkpoint.hub import check_repo_id

    check_repo_id(str(params.get("repo_id", "")))


@stage("push", writes_model=False, check=_check_push)
def push_stage(ctx: Context, *, repo_id: str, private: bool = False, revision: str | None = None,
               dry_run: bool = False, message: str | None = None) -> dict:
    from ..checkpoint.hub import push

    result = push(ctx.inputs[0], repo_id, private=private, revision=revision, dry_run=dry_run,
                  commit_message=message, progress=ctx.progress)
    _write_json(ctx.out, "push.json", result)
    return {k: result.get(k) for k in ("repo_id", "revision", "dry_run", "total_bytes", "commit", "commit_url")}

