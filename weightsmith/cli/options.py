"""Typer flags generated from a stage's options class (``weightsmith.options``), and CLI wording of its errors.

    @app.command("shrink")
    @with_options(ShrinkOptions)
    def shrink_cmd(model: Annotated[Path, typer.Argument(help="...")], opts: ShrinkOptions, quiet: QuietOpt = False):
        shrink(model, opts)

The ``opts`` parameter is replaced by one flag per option (``--ratio``, ``--mode``, ``--data``) in its place;
the command receives the built options object. An ``OptionError`` raised while building it or inside the
command is reworded with flags (``--ratio: 2.0 is out of range; ...``).
"""
from __future__ import annotations

import functools
import inspect
from collections.abc import Callable, Sequence
from typing import Annotated, Any

import typer

from ..errors import OptionError, WeightsmithError
from ..options import Options, OptionSpec


def flag(param: str) -> str:
    """The command-line spelling of an option's library name."""
    return "--" + param.replace("_", "-")


def _decls(name: str, spec: OptionSpec, kind: Any, default: Any) -> list[str]:
    long = spec.flag or flag(name)
    if kind is bool and default is True and "/" not in long:
        long = f"{long}/--no-{long[2:]}"
    return [long, *([spec.short] if spec.short else []), *spec.aliases]


def _metavar(spec: OptionSpec, kind: Any) -> str | None:
    if spec.metavar is not None:
        return spec.metavar
    if kind in (bool, bool | None):
        return ""  # a switch takes no value: no "<bool>" beside it
    text = "[" + "|".join(map(str, spec.choices)) + "]" if spec.choices else None
    return text if text and len(text) <= 24 else None  # a long list reads better in the help text


def option_parameters(cls: type[Options], only: Sequence[str] | None = None) -> list[inspect.Parameter]:
    """One keyword-only parameter per CLI option of ``cls`` (those named in ``only``, in its order, when given),
    annotated for Typer."""
    fields = cls.__dataclass_fields__
    params = []
    for name in only if only is not None else list(fields):
        spec = fields[name].metadata.get("option")
        if spec is None or not spec.cli:
            continue
        default = ... if name in cls.required() else fields[name].default
        params.append(inspect.Parameter(name, inspect.Parameter.KEYWORD_ONLY, default=default,
                                        annotation=annotated(cls, name)))
    return params


def annotated(cls: type[Options], name: str) -> Any:
    """Option ``name`` of ``cls`` as a Typer annotation (``Annotated[type, typer.Option(...)]``)."""
    f = cls.__dataclass_fields__[name]
    spec, kind = f.metadata["option"], cls.hints()[name]
    default = ... if name in cls.required() else f.default
    return Annotated[kind, typer.Option(*_decls(name, spec, kind, default), help=spec.help, metavar=_metavar(spec, kind),
                                        rich_help_panel=spec.panel)]


def spelled(param: str, cls: type[Options] | None = None) -> str:
    """The flag of option ``param``: as ``cls`` declares it, when it declares one, else ``--NAME-WITH-DASHES``."""
    spec = cls.specs().get(param) if cls is not None else None
    return spec.flag.split("/")[0] if spec is not None and spec.flag else flag(param)


def cli_wording(exc: OptionError, cls: type[Options] | None = None) -> WeightsmithError:
    """The same error with every option spelled as its flag (as ``cls`` declares it, when it declares one)."""
    return WeightsmithError(exc.render(lambda p: spelled(p, cls)))


def with_options(cls: type[Options], param: str = "opts", only: Sequence[str] | None = None
                 ) -> Callable[[Callable], Callable]:
    """Replace the command's ``param`` parameter by ``cls``'s flags (those in ``only``, when given); the command
    gets the built object."""
    def decorate(fn: Callable) -> Callable:
        sig = inspect.signature(fn, eval_str=True)
        generated = option_parameters(cls, only)
        names = [p.name for p in generated]
        params: list[inspect.Parameter] = []
        for p in sig.parameters.values():
            if p.name == param:
                params.extend(generated)
            elif p.kind is inspect.Parameter.VAR_KEYWORD:
                params.append(p)
            else:
                params.append(p.replace(kind=inspect.Parameter.KEYWORD_ONLY))

        @functools.wraps(fn)
        def command(**kwargs: Any) -> Any:
            values = {n: kwargs.pop(n) for n in names}
            try:
                return fn(**kwargs, **{param: cls(**values)})
            except OptionError as exc:
                raise cli_wording(exc, cls) from None

        command.__signature__ = sig.replace(parameters=params)
        command.__annotations__ = {p.name: p.annotation for p in params}
        del command.__wrapped__  # Typer must read the generated signature, not fn's
        return command
    return decorate
