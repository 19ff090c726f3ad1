"""The merge-method registry: one declaration per method, read by the engine, the CLI help and ``--list-methods``.

A method is one decorated function (mergekit's ``easy_define`` idea, with weightsmith's ``Param``)::

    @merge_method("task_arithmetic", title="Task Arithmetic", url="https://arxiv.org/abs/2212.04089",
                  base="required", params=(WEIGHT, normalize_param(False), LAMBDA), inplace=True)
    def task_arithmetic(tensors, base, weight, normalize=False, lambda_=1.0, inplace=False): ...

The call contract, for a tensor function (``base`` is 'required' or 'none'):

- ``fn(tensors, base, **kwargs)`` (``fn(tensors, **kwargs)`` without a base): ``tensors`` are the
  inputs' tensors for one name (the base excluded), float32, or the recipe's ``dtype`` when the
  engine runs mergekit's arithmetic (``reference`` below);
- ``kwargs`` holds every declared ``Param`` under its ``arg`` name (``lambda`` arrives as ``lambda_``;
  a Param with ``arg=None`` is checked and shown but not passed). A 'model' Param arrives as a list
  with one value per input, a 'global' Param as one value; values are already evaluated for the
  tensor (layer gradients, filters) and checked against the Param's kind, range and choices;
- ``inplace=True`` when declared ``inplace=True``: the inputs are the engine's own copies and may
  be overwritten; ``generators`` (one ``torch.Generator`` per input) when ``random=True``;
- it returns the merged tensor (any float dtype; the engine casts to the output dtype).

Hooks, all optional:

- ``validate(check: PlanCheck)``: rules spanning parameters or tensors, run at plan time with every
  tensor's resolved parameters (raise ``WeightsmithError``);
- ``prepass(jobs, stream, progress)``: a reading pass before the merge (TIES' whole-model trim),
  may add entries to ``job.kwargs``; ``stream(jobs)`` yields each job's input tensors, base first (the
  engine reads the next job's while the current one is used, within its memory rule);
- ``rewrite(recipe, params, where) -> (Recipe, card)``: turn the recipe into another method's
  recipe before planning (MWA computes weights, then merges linearly);
- ``reference``: a short torch implementation that performs mergekit 0.1.5's arithmetic in the
  tensors' own dtype. The engine uses it under ``compat: mergekit`` (in float32 too, unless
  ``compat_fast`` says the fast path is bit-equal to mergekit there); the tests check every fast
  path against it;
- ``whole_model``: a function ``(recipe, out, **options) -> report`` (or "module:function") for
  methods that need whole models or data (greedy soup, PLeaS); its Params are checked first.

Modules that declare methods are listed in ``METHOD_MODULES``; they are imported on first use.
"""
from __future__ import annotations

import difflib
import importlib
import inspect
import math
import sys
from collections.abc import Callable
from dataclasses import dataclass, field

from ..errors import OptionError, WeightsmithError, needs_option
from ..options import OptionSpec, check_value
from .settings import evaluate_setting

# Modules whose import registers methods (a new method module adds itself here).
METHOD_MODULES = ["weightsmith.merge.methods", "weightsmith.merge.methods_extra"]
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
    whole_model: Callable | str | None = None
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

    def whole_model_fn(self) -> Callable:
        target = self.whole_model
        if isinstance(target, str):
            module, fn = target.split(":")
            try:
                target = getattr(importlib.import_module(module), fn)
            except (ImportError, AttributeError):
                raise WeightsmithError(f"merge method {self.name!r} is not available in this installation") from None
        return target

    def describe(self) -> dict:
        return {"name": self.name, "title": self.title, "url": self.url, "base": self.base,
                "min_models": self.min_models, "max_models": self.max_models, "random": self.random,
                "kind": "whole-model" if self.whole_model else "tensor",
                "mergekit_reference": self.reference is not None, "notes": self.notes,
                "params": [p.describe() for p in self.params]}


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


def merge_method(name: str, *, title: str, url: str, params: tuple[Param, ...] = (), **options):
    """Decorator declaring ``fn`` as merge method ``name`` (see the module docstring for the contract)."""
    module = sys._getframe(1).f_globals.get("__name__", "")

    def wrap(fn: Callable | None) -> Callable | None:
        register(Method(name, fn, title, url, tuple(params), module=module, **options))
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


def check_param_names(method: Method, recipe, where: str, compat: str | None) -> list[str]:
    """Every recipe parameter must be one the method declares; returns notes for keys mergekit ignores
    (accepted only under compat: mergekit)."""
    known = {p.name for p in method.params}
    notes = []
    for key in recipe.parameters:
        if key not in known:
            raise WeightsmithError(f"{where}: method {method.name!r} has no parameter {key!r}{closest(key, known)}; "
                                   f"it takes {', '.join(sorted(known)) or 'none'}")
    ignored: set[str] = set()
    for m in recipe.models:
        for key in list(m.parameters):
            p = method.param(key)
            if p is None and key in method.mergekit_ignores:
                if compat != "mergekit":
                    raise needs_option(f"{where}: model {m.path}: method {method.name!r} has no per-model parameter "
                                       f"{key!r}", " (mergekit accepts and ignores it: {0} mergekit does the same)",
                                       "compat")
                ignored.add(key)
                del m.parameters[key]
                continue
            if p is None:
                raise WeightsmithError(f"{where}: model {m.path}: method {method.name!r} has no parameter "
                                       f"{key!r}{closest(key, known)}")
            if p.scope != "model":
                raise WeightsmithError(f"{where}: model {m.path}: {key!r} is a global parameter of "
                                       f"{method.name!r}; give it under the recipe's top-level parameters")
    if ignored:
        notes.append(f"per-model {', '.join(sorted(ignored))} ignored by {method.name} (as mergekit does)")
    return notes


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
