"""Stage options, declared once: a keyword-only dataclass per stage whose fields carry name, type, default,
range or choices and help. The same declaration serves three readers:

* the CLI generates the command's ``--flags`` from it (``weightsmith.cli.options.with_options``);
* a pipeline validates a stage's ``params:`` against it (unknown keys, types, ranges, choices);
* the library function takes the object (``evaluate(paths, opts)``), so its defaults are the CLI's.

Example::

    class ShrinkOptions(Options):
        \"\"\"Options of a hypothetical ``shrink`` stage.\"\"\"
        ratio: float = option(0.5, lo=0, hi=1, lo_open=True, help="Fraction of weights kept.")
        mode: str = option("row", choices=("row", "tensor"), help="Unit the ratio applies to.")
        data: Path | None = option(None, path=True, help="Calibration text.")

    ShrinkOptions(ratio=2)            # OutOfRange: "ratio: 2 is out of range; it must be in (0, 1]"
    ShrinkOptions.build(None, mode="tensor").mode == "tensor"

Adding an option to a stage is one field here: it appears in ``--help``, in pipeline validation and, through
``to_dict()``, in what the stage records. Bad values raise the typed errors of ``weightsmith.errors``, worded
with the option's library name; the CLI and the pipeline reword the name for their users.
"""
from __future__ import annotations

import dataclasses
import math
import re
import typing
from collections.abc import Sequence
from dataclasses import MISSING, dataclass, field, fields
from pathlib import Path
from typing import Any

from .errors import InvalidChoice, MissingOption, OptionError, OutOfRange, UnknownOption

DTYPES = ("float32", "bfloat16", "float16", "fp32", "bf16", "fp16")  # as weightsmith.device resolves them


@dataclass(frozen=True)
class OptionSpec:
    """What an option declares besides its name, type and default (see :func:`option`)."""
    help: str
    choices: tuple | None = None
    lo: float | None = None
    hi: float | None = None
    lo_open: bool = False
    hi_open: bool = False
    path: bool = False       # names a file or folder (a pipeline resolves it against the YAML and checks it exists)
    cli: bool = True         # offered as a command-line flag
    pipeline: bool = True    # accepted under a pipeline stage's params:
    flag: str | None = None  # the flag, when it is not --NAME-WITH-DASHES (bools: --NAME/--no-NAME when on)
    short: str | None = None  # a one-letter alias such as -o
    aliases: tuple[str, ...] = ()  # further flags accepted for it (an older spelling such as --seq)
    size: bool = False       # a size in bytes given as text (5B, 2GB, 300MiB): the built options hold the int
    panel: str | None = None  # the --help section it is listed in (None: Options)
    metavar: str | None = None  # how --help shows its value (None: its choices, or its type)


def option(default: Any = MISSING, *, help: str, choices: Sequence | None = None, lo: float | None = None,
           hi: float | None = None, lo_open: bool = False, hi_open: bool = False, path: bool = False,
           cli: bool = True, pipeline: bool = True, flag: str | None = None, short: str | None = None,
           aliases: Sequence[str] = (), size: bool = False, panel: str | None = None,
           metavar: str | None = None) -> Any:
    """A dataclass field declaring one option; no ``default`` makes it required."""
    spec = OptionSpec(help=help, choices=tuple(choices) if choices is not None else None, lo=lo, hi=hi,
                      lo_open=lo_open, hi_open=hi_open, path=path, cli=cli, pipeline=pipeline, flag=flag,
                      short=short, aliases=tuple(aliases), size=size, panel=panel, metavar=metavar)
    return field(default=default, metadata={"option": spec})


# Sizes count bytes, as mergekit's writer does (numel * element_size): K, M, B, T are its 10**3 ... 10**12
# suffixes (5B = 5 billion bytes); KB, MB, GB, TB and KiB, MiB, GiB, TiB are byte units; a bare number is bytes.
_UNITS = {"": 1, "K": 10**3, "M": 10**6, "B": 10**9, "T": 10**12, "KB": 10**3, "MB": 10**6, "GB": 10**9,
          "TB": 10**12, "KIB": 2**10, "MIB": 2**20, "GIB": 2**30, "TIB": 2**40}
MIN_SIZE = 1000  # a shard limit under 1 KB writes one file per tensor: always a slip


def parse_size(text: str | int, param: str = "out_shard_size") -> int:
    """Bytes, from a size as every stage's ``--out-shard-size`` takes it: ``5B`` (mergekit's 5 billion bytes),
    ``2GB``, ``300MiB``, ``1.5K`` or a byte count; at least 1 KB. Refused as an error of option ``param``."""
    if isinstance(text, int) and not isinstance(text, bool):
        n = text
    else:
        m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([A-Za-z]*)\s*", str(text))
        if not m or m.group(2).upper() not in _UNITS:
            raise OptionError(param, f"{text!r} not understood; write a size in bytes: 5B (5 billion, as mergekit), "
                                     "2GB, 500MB, 1GiB or a byte count")
        n = int(float(m.group(1)) * _UNITS[m.group(2).upper()])
    if n < MIN_SIZE:
        raise OptionError(param, f"{text!r} is {n} bytes; shards under 1KB are refused (did you mean 1B, one "
                                 "billion bytes?)")
    return n


def check_value(param: str, value: Any, spec: OptionSpec) -> None:
    """The one check behind every option: choices and range; None (an unset optional) always passes."""
    if value is None:
        return
    if isinstance(value, float) and math.isnan(value):  # compares false with every bound, so no range holds it
        raise OptionError(param, "nan is not a number")
    if spec.choices is not None and value not in spec.choices:
        raise InvalidChoice(param, value, spec.choices)
    if spec.lo is not None or spec.hi is not None:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise OptionError(param, f"{value!r} is not a number")
        low = spec.lo is not None and (value <= spec.lo if spec.lo_open else value < spec.lo)
        high = spec.hi is not None and (value >= spec.hi if spec.hi_open else value > spec.hi)
        if low or high:
            raise OutOfRange(param, value, spec.lo, spec.hi, lo_open=spec.lo_open, hi_open=spec.hi_open)


@typing.dataclass_transform(kw_only_default=True, field_specifiers=(option,))
class Options:
    """Base of the per-stage options classes: each subclass is a keyword-only dataclass that validates on
    construction (each field, then :meth:`check`)."""

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        dataclass(kw_only=True)(cls)

    def __post_init__(self) -> None:
        for f, spec in self.specs().items():
            value = getattr(self, f)
            if spec.path and isinstance(value, str):
                setattr(self, f, value := Path(value))
            if spec.size and value is not None:
                setattr(self, f, value := parse_size(value, f))
            check_value(f, value, spec)
        self.check()

    def check(self) -> None:
        """Rules across options (e.g. one value needs another option); raise an ``OptionError``."""

    @classmethod
    def specs(cls) -> dict[str, OptionSpec]:
        return {f.name: f.metadata["option"] for f in fields(cls) if "option" in f.metadata}

    @classmethod
    def hints(cls) -> dict[str, Any]:
        return typing.get_type_hints(cls)

    @classmethod
    def required(cls) -> list[str]:
        return [f.name for f in fields(cls) if f.default is MISSING and f.default_factory is MISSING]

    @classmethod
    def default(cls, name: str) -> Any:
        f = next(f for f in fields(cls) if f.name == name)
        return f.default

    @classmethod
    def build(cls, opts: Options | None = None, /, **values: Any) -> Options:
        """``opts`` (or the defaults) with ``values`` replacing fields; unknown names raise UnknownOption."""
        known = cls.specs()
        for name in values:
            if name not in known:
                raise UnknownOption(name, list(known))
        if opts is not None:
            return dataclasses.replace(opts, **values) if values else opts
        missing = [n for n in cls.required() if n not in values]
        if missing:
            raise MissingOption(missing[0])
        return cls(**values)

    @classmethod
    def from_params(cls, params: dict) -> Options:
        """From a pipeline stage's params: only options offered to pipelines are accepted."""
        offered = [n for n, s in cls.specs().items() if s.pipeline]
        for name in params:
            if name not in offered:
                raise UnknownOption(name, offered)
        return cls.build(None, **params)

    def to_dict(self, exclude: Sequence[str] = ()) -> dict[str, Any]:
        """The options as JSON-able values (paths as text), e.g. for a model card."""
        return {f.name: str(v) if isinstance(v := getattr(self, f.name), Path) else v for f in fields(self)
                if f.name not in exclude}


# -- options that several stages share: one name, one help text per concept -----------------------------

def max_tokens_option(default: int | None, help: str = "Calibration tokens read from the data, in all.") -> Any:
    return option(default, lo=1, help=help)


def seq_len_option(default: int | None, help: str = "Tokens per calibration window.", **more: Any) -> Any:
    return option(default, lo=2, help=help, **more)


def batch_size_option(default: int = 8, help: str = "Windows per forward pass.") -> Any:
    return option(default, lo=1, help=help)


def out_shard_size_option(default: str = "5B") -> Any:
    return option(default, size=True, help="Largest output shard in bytes: 5B (5 billion, as mergekit), 2GB, 500MB, "
                                           "1GiB or a count.")
