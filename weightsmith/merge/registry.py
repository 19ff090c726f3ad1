"""The merge-method registry: one declaration per method, read by the planner, the engine, the CLI (its flags,
help and ``--list-methods``) and pipelines.

A method is one decorated function, its declaration beside it (mergekit's ``easy_define`` idea, with
weightsmith's ``Param``)::

    @merge_method("task_arithmetic", title="Task Arithmetic", url="https://arxiv.org/abs/2212.04089",
                  base="required", params=(WEIGHT, normalize_param(False), LAMBDA), inplace=True)
    def task_arithmetic(tensors, base, weight, normalize=False, lambda_=1.0, inplace=False): ...

What the function is, ``kind``:

- 'tensor' (the default): ``fn(tensors, base, **kwargs)`` (``fn(tensors, **kwargs)`` without a base):
  ``tensors`` are the inputs' tensors for one name (the base excluded), float32, or the recipe's
  ``dtype`` when the engine runs mergekit's arithmetic (``reference`` below); ``kwargs`` holds every
  declared ``Param`` under its ``arg`` name (``lambda`` arrives as ``lambda_``; a Param with ``arg=None``
  is checked and shown but not passed). A 'model' Param arrives as a list with one value per input, a
  'global' Param as one value; values are already evaluated for the tensor (layer gradients, filters)
  and checked against the Param's kind, range and choices; ``inplace=True`` when declared
  ``inplace=True`` (the inputs are the engine's own copies and may be overwritten); ``generators`` (one
  ``torch.Generator`` per input) when ``random=True``. It returns the merged tensor (any float dtype;
  the engine casts to the output dtype);
- 'rewrite': ``fn(recipe, params, where) -> (Recipe, card)`` turns the recipe into another method's
  before planning (MWA computes weights, then merges linearly);
- 'whole_model': ``fn(recipe, out, **options) -> report`` runs the whole merge, for methods that need
  whole models or data (greedy soup, PLeaS); its Params are checked first.

Hooks, all optional:

- ``validate(check: PlanCheck)``: rules spanning parameters or tensors, run at plan time with every
  tensor's resolved parameters (raise ``WeightsmithError``);
- ``prepass(jobs, stream, progress)``: a reading pass before the merge (TIES' whole-model trim),
  may add entries to ``job.kwargs``; ``stream(jobs)`` yields each job's input tensors, base first (the
  engine reads the next job's while the current one is used, within its memory rule);
- ``reference``: a short torch implementation that performs mergekit 0.1.5's arithmetic in the
  tensors' own dtype (``True``: the function itself does). The engine uses it under ``compat: mergekit``
  (in float32 too, unless ``compat_fast`` says the fast path is bit-equal to mergekit there); the
  tests check every fast path against it.

Modules that declare methods are listed in ``METHOD_MODULES``; they are imported on first use.
"""
from __future__ import annotations

import difflib
import importlib
import inspect
import math
import sys
import typing
from collections.abc import Callable
from dataclasses import dataclass

from ..errors import OptionError, WeightsmithError
from ..options import OptionSpec, check_value
from .settings import evaluate_setting

# Modules whose import registers methods (a new method module adds itself here).
METHOD_MODULES = [f"weightsmith.merge.methods.{m}" for m in (
    "average", "task_arithmetic", "ties", "dare", "breadcrumbs", "consensus", "spherical", "swap", "mwa",
    "whole_model")]
KINDS = ("tensor", "rewrite", "whole_model")
BASE_POLICIES = ("required", "optional", "none")


def recipe_key(name: str) -> str:
    """How a recipe's reader sees a parameter named in an error."""
    return f"parameter {name!r}"


@dataclass(frozen=True)
class Param:
    """One parameter. ``scope`` 'model' (one value per input, mergekit's per-model parameters) or 'global'.

    ``kind`` is float, int, bool or str; ``low``/``high`` bound numbers (inclusive), ``choices`` lists
    the allowed values; ``mergekit`` is the default under ``compat: mergekit`` where mergekit's
    differs; ``arg`` is the function's keyword (None: accepted and checked, not passed);
    ``required`` means no default: the recipe must give it.
    """
    name: str
    kind: type
    default: object = None
    scope: str = "global"
    low: float | None = None
    high: float | None = None
    choices: tuple = ()
    help: str = ""
    mergekit: object = None
    arg: str | None = ""
    required: bool = False

    @property
    def keyword(self) -> str | None:
        if self.arg is None:
            return None
        return self.arg or (self.name + "_" if self.name in ("lambda",) else self.name)

    def spec(self) -> OptionSpec:
        """The option declaration ``check_value`` reads: choices and the inclusive range."""
        return OptionSpec(help=self.help, choices=self.choices or None, lo=self.low, hi=self.high)

    def check(self, value, where: str):
        """``value`` checked and converted to the Param's kind. A bad one raises a typed ``OptionError`` named by
        the parameter and located at ``where`` in the recipe (its message: ``where: parameter 'name': ...``)."""
        try:
            return self._checked(value)
        except OptionError as exc:
            raise exc.at(where, recipe_key) from None

    def _checked(self, value):
        if self.kind is bool:
            if not isinstance(value, bool):
                raise OptionError(self.name, f"must be true or false, got {value!r}")
            return value
        if self.choices:
            check_value(self.name, value, self.spec())
            return value
        if self.kind is str:
            if not isinstance(value, str) or not value:
                raise OptionError(self.name, f"must be a text value, got {value!r}")
            return value
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise OptionError(self.name, f"must be a number, got {value!r}")
        if self.kind is int:
            if isinstance(value, float) and not value.is_integer():
                raise OptionError(self.name, f"must be a whole number, got {value!r}")
            value = int(value)
        else:
            value = float(value)
            if not math.isfinite(value):
                raise OptionError(self.name, f"must be finite, got {value}")
        check_value(self.name, value, self.spec())
        return value

    def describe(self) -> dict:
        row = {"name": self.name, "scope": self.scope, "kind": self.kind.__name__, "default": self.default,
               "help": self.help}
        if self.required:
            row["required"] = True
        if self.low is not None or self.high is not None:
            row["range"] = [self.low, self.high]
        if self.choices:
            row["choices"] = list(self.choices)
        if self.mergekit is not None:
            row["mergekit_default"] = self.mergekit
        return row


@dataclass
class PlanCheck:
    """What a ``validate`` hook sees: the method, the models (base excluded) and each float tensor's
    resolved parameters (the function's keyword arguments)."""
    method: "Method"
    models: list[str]
    tensors: list[tuple[str, dict]]
    where: str
    compat: str | None = None


@dataclass(frozen=True)
class Method:
    name: str
    fn: Callable | None
    title: str
    url: str
    params: tuple[Param, ...] = ()
    base: str = "none"  # 'required', 'optional', 'none'
    min_models: int = 1
    max_models: int | None = None
    random: bool = False
    inplace: bool = False
    validate: Callable[[PlanCheck], None] | None = None
    prepass: Callable | None = None
    rewrite: Callable | None = None
    reference: Callable | None = None
    whole_model: Callable | None = None
    compat_fast: bool = False  # fn reproduces mergekit's float32 arithmetic, so compat: mergekit uses it in float32
    mergekit_ignores: tuple[str, ...] = ()  # per-model keys mergekit accepts and ignores (noted under compat)
    notes: str = ""
    module: str = ""

    @property
    def takes_base(self) -> bool:
        """Whether a base model, when the recipe names one, is an input apart from the others."""
        return self.base in ("required", "optional")

    def param(self, name: str) -> Param | None:
        return next((p for p in self.params if p.name == name), None)

    def describe(self) -> dict:
        return {"name": self.name, "title": self.title, "url": self.url, "base": self.base,
                "min_models": self.min_models, "max_models": self.max_models, "random": self.random,
                "kind": "whole-model" if self.whole_model else "tensor",
                "mergekit_reference": self.reference is not None, "notes": self.notes,
                "params": [p.describe() for p in self.params]}


def params_of(options, skip: tuple[str, ...] = ()) -> tuple[Param, ...]:
    """The recipe parameters of a stage whose options class (``stage_options``) declares them once: one global
    ``Param`` per option but ``skip``, with its kind, default, range, choices and help."""
    import dataclasses

    hints, specs = options.hints(), options.specs()
    out = []
    for f in dataclasses.fields(options):
        spec = specs.get(f.name)
        if spec is None or f.name in skip:
            continue
        if spec.lo_open or spec.hi_open:
            raise TypeError(f"{options.__name__}.{f.name}: an open bound has no Param form")
        kind = next(k for k in (bool, int, float, str) if k in typing.get_args(hints[f.name]) + (hints[f.name],)) \
            if not spec.path else str
        default = None if f.default is dataclasses.MISSING else f.default
        out.append(Param(f.name, kind, default, low=spec.lo, high=spec.hi, choices=spec.choices or (),
                         help=spec.help))
    return tuple(out)


REGISTRY: dict[str, Method] = {}
COMPAT = Param("compat", str, "paper", choices=("paper", "mergekit"),
               help="'mergekit' selects mergekit 0.1.5's choices where they differ from the paper, and its "
                    "arithmetic in the recipe's dtype")


def _check_signature(m: Method) -> None:
    """A declaration error is a programming error: caught when the module is imported (and by the tests)."""
    if m.fn is None:
        return
    sig = inspect.signature(m.fn)
    names = set(sig.parameters)
    takes_any = any(p.kind is inspect.Parameter.VAR_KEYWORD for p in sig.parameters.values())
    wanted = [p.keyword for p in m.params if p.keyword] + (["inplace"] if m.inplace else []) \
        + (["generators"] if m.random else [])
    missing = [w for w in wanted if w not in names and not takes_any]
    if missing:
        raise TypeError(f"merge method {m.name!r}: {m.fn.__name__} has no keyword {missing[0]!r}")


def register(m: Method) -> Method:
    if m.name in REGISTRY and REGISTRY[m.name].module != m.module:
        raise TypeError(f"merge method {m.name!r} is declared twice ({REGISTRY[m.name].module}, {m.module})")
    if m.base not in BASE_POLICIES:
        raise TypeError(f"merge method {m.name!r}: base must be one of {BASE_POLICIES}")
    if "compat" not in {p.name for p in m.params} and m.whole_model is None:
        # every tensor method accepts compat: at least it selects mergekit's dtype handling
        m = Method(**{**m.__dict__, "params": (*m.params, Param(**{**COMPAT.__dict__, "arg": None}))})
    _check_signature(m)
    REGISTRY[m.name] = m
    return m


def merge_method(name: str, *, title: str, url: str, params: tuple[Param, ...] = (), kind: str = "tensor",
                 reference: Callable | bool | None = None, **options):
    """Decorator declaring ``fn`` as merge method ``name`` (see the module docstring for the contract)."""
    module = sys._getframe(1).f_globals.get("__name__", "")
    if kind not in KINDS:
        raise TypeError(f"merge method {name!r}: kind must be one of {KINDS}")

    def wrap(fn: Callable) -> Callable:
        roles = {k: (fn if kind == k else None) for k in ("rewrite", "whole_model")}
        register(Method(name, fn if kind == "tensor" else None, title, url, tuple(params), module=module,
                        reference=fn if reference is True else reference, **roles, **options))
        return fn
    return wrap


def _load() -> None:
    for module in METHOD_MODULES:
        importlib.import_module(module)


def all_methods() -> dict[str, Method]:
    """Every registered method by name (imports the method modules on first use)."""
    _load()
    return REGISTRY


def get_method(name: str) -> Method:
    table = all_methods()
    try:
        return table[name]
    except KeyError:
        raise WeightsmithError(f"unknown merge_method {name!r}{closest(name, table)}; known: "
                               f"{', '.join(sorted(table))}") from None


def closest(word: str, known) -> str:
    """' (did you mean X?)' for the closest known word, or ''."""
    match = difflib.get_close_matches(str(word), list(known), n=1, cutoff=0.6)
    return f" (did you mean {match[0]!r}?)" if match else ""


def resolve(param: Param, setting, tensor: str, t: float, where: str, compat: str | None, explicit: bool):
    """One parameter's value for a tensor at relative depth ``t``: the setting evaluated (gradients,
    filters), else the default (mergekit's under compat: mergekit), checked against the Param."""
    value = evaluate_setting(setting, tensor, t, where) if setting is not None else None
    if value is None:
        value = param.default
        if compat == "mergekit" and not explicit and param.mergekit is not None:
            value = param.mergekit
        if value is None:
            if param.required:
                raise WeightsmithError(f"{where}: parameter {param.name!r} is required")
            return None
    if param.name == "rescale" and isinstance(value, bool):  # mergekit's boolean form
        value = "l1" if value else "none"
    return param.check(value, where)


def resolve_globals(method: Method, recipe, where: str) -> dict:
    """The method's global parameters, resolved once (for hooks and whole-model methods)."""
    out = {}
    for p in method.params:
        if p.scope == "global":
            out[p.name] = resolve(p, recipe.parameters.get(p.name), "", 0.0, where, None, p.name in recipe.parameters)
    return out
