"""Layer stacking: mergekit's ``slices:`` recipes (frankenmerges such as ``passthrough`` of layer
ranges, or per-slice merges with their own methods' parameters).

An output model is the concatenation of slices; a slice lists sources (a model and a ``layer_range``
[start, end)) of equal length, and output layer j of the slice is the merge of layer start+j of every
source. Non-layer tensors (embeddings) come from the first slice's sources, the head and final norm
from the last slice's, as mergekit plans them. A parameter is looked up, first found wins: the
source's ``parameters``, the slice's, the recipe's; its layer gradient runs over the slice's own
layers (t = j / (n−1), 1 for a one-layer slice) and is 0 for non-layer tensors.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import torch

from ..checkpoint import Checkpoint, detect_layout
from ..checkpoint.layout import num_layers
from ..errors import MissingOption, WeightsmithError, needs_option
from .recipe import evaluate_setting, model_entry, parameters_of, refuse_unknown

SLICE_KEYS = {"sources", "base_model", "parameters"}
SOURCE_KEYS = {"model", "layer_range", "parameters"}
LAYER_KEYS = ("num_hidden_layers", "n_layer", "num_layers")


@dataclass
class SliceSource:
    model: str
    layers: tuple[int, int]
    parameters: dict = field(default_factory=dict)


@dataclass
class Slice:
    sources: list[SliceSource]
    base_model: str | None = None
    parameters: dict = field(default_factory=dict)

    @property
    def length(self) -> int:
        return self.sources[0].layers[1] - self.sources[0].layers[0]


def parse_slices(raw, source: str, model_ref) -> list[Slice]:
    """The ``slices:`` list of a recipe; ``model_ref(value, where)`` reads a model reference."""
    if not isinstance(raw, list) or not raw:
        raise WeightsmithError(f"{source}: 'slices' must be a non-empty list of {{sources: [...]}}")
    out = []
    for i, s in enumerate(raw):
        where = f"{source}: slices[{i}]"
        if not isinstance(s, dict):
            raise WeightsmithError(f"{where}: expected a mapping with 'sources'")
        if "residual_weight" in s:
            raise WeightsmithError(f"{where}: 'residual_weight' is not supported (mergekit 0.1.5 accepts it but "
                                   "never reads it); remove it")
        refuse_unknown(s, SLICE_KEYS, where)
        raw_sources = s.get("sources")
        if not isinstance(raw_sources, list) or not raw_sources:
            raise WeightsmithError(f"{where}: 'sources' must be a non-empty list of {{model, layer_range}}")
        sources = []
        for j, src in enumerate(raw_sources):
            at = f"{where}: sources[{j}]"
            src = model_entry(src, SOURCE_KEYS, at, "each source needs 'model: PATH' and 'layer_range: [start, end]'")
            rng = src.get("layer_range")
            if (not isinstance(rng, list) or len(rng) != 2 or not all(isinstance(x, int) and not isinstance(x, bool)
                                                                        for x in rng) or not 0 <= rng[0] < rng[1]):
                raise WeightsmithError(f"{at}: 'layer_range' must be [start, end] with 0 <= start < end, got {rng!r}")
            sources.append(SliceSource(model_ref(src["model"], at), (rng[0], rng[1]), parameters_of(src, at)))
        lengths = {x.layers[1] - x.layers[0] for x in sources}
        if len(lengths) > 1:
            raise WeightsmithError(f"{where}: every source of a slice must span the same number of layers, got "
                                   f"{sorted(lengths)}")
        base = model_ref(s["base_model"], f"{where}: base_model") if s.get("base_model") is not None else None
        out.append(Slice(sources, base, parameters_of(s, where)))
    return out



def first_setting(scopes: list[dict], key: str, tensor: str, t: float, where: str):
    """The value of ``key`` from the first scope whose setting gives one for this tensor (a filter list
    that matches nothing falls through to the next scope, as in mergekit); None if none does."""
    for scope in scopes:
        if key in scope:
            value = evaluate_setting(scope[key], tensor, t, where)
            if value is not None:
                return value
    return None


@dataclass
class SliceInput:
    model: str
    name: str  # the tensor's name in that model
    scopes: list[dict]  # per-model parameter scopes, highest precedence first


@dataclass
class SliceTensor:
    """One output tensor: its inputs (the base, when the slice has one among its sources, is ``base``)."""
    name: str
    inputs: list[SliceInput]
    base: SliceInput | None
    t: float
    scopes: list[dict]  # global parameter scopes, highest precedence first


def plan_slices(slices: list[Slice], base_model: str | None, parameters: dict, open_ckpt, takes_base: bool
                ) -> tuple[list[SliceTensor], int, Checkpoint]:
    """Every output tensor of a slices recipe, in output order, and the output's layer count; reads
    headers only. ``open_ckpt(path)`` opens (and caches) a checkpoint; ``takes_base`` says whether the
    method treats the base apart (a base not among a slice's sources is an error then)."""
    layouts = {}

    def layout(path: str):
        if path not in layouts:
            ck = open_ckpt(path)
            layouts[path] = detect_layout(ck.config, ck.names(), path)
        return layouts[path]

    for i, s in enumerate(slices):
        for j, src in enumerate(s.sources):
            n = layout(src.model).num_blocks
            if src.layers[1] > n:
                raise WeightsmithError(f"slices[{i}]: sources[{j}]: layer_range {list(src.layers)} reaches past "
                                       f"{src.model}'s {n} layers")
    first = slices[0].sources[0].model
    out_layout = layout(base_model or first)
    plan: list[SliceTensor] = []

    def inputs_of(s: Slice, names: list[str], t: float, out_name: str) -> SliceTensor:
        base_path = s.base_model or base_model
        ins, base = [], None
        for src, name in zip(s.sources, names):
            own = [x.parameters for x in s.sources if x.model == src.model]
            item = SliceInput(src.model, name, [*own, s.parameters, parameters])
            if takes_base and base_path is not None and base is None and _same(src.model, base_path):
                base = item
            else:
                ins.append(item)
        if takes_base and base_path is not None and base is None:
            raise WeightsmithError(f"slice with sources {[x.model for x in s.sources]}: its base_model {base_path} "
                                   "is not among them; list it as a source with the same layer_range")
        return SliceTensor(out_name, ins, base, t, [s.parameters, parameters])

    ref = open_ckpt(base_model or first)
    outside = [n for n in ref.names() if out_layout.block_of(n) is None]
    head = set(out_layout.head) | set(out_layout.final_norm)
    pre = [n for n in outside if n not in head]
    post = [n for n in outside if n in head]
    for name in pre:
        plan.append(inputs_of(slices[0], [name] * len(slices[0].sources), 0.0, name))
    index = 0
    for s in slices:
        keys = _block_keys(layout(s.sources[0].model), open_ckpt(s.sources[0].model), s.sources[0].layers[0])
        for j in range(s.length):
            t = j / (s.length - 1) if s.length > 1 else 1.0
            for key in keys:
                names = [layout(src.model).block_name(src.layers[0] + j, key) for src in s.sources]
                for src, nm in zip(s.sources, names):
                    if nm not in open_ckpt(src.model):
                        raise WeightsmithError(f"{src.model}: has no tensor {nm!r} (slice layer {src.layers[0] + j})")
                plan.append(inputs_of(s, names, t, out_layout.block_name(index, key)))
            index += 1
    for name in post:
        plan.append(inputs_of(slices[-1], [name] * len(slices[-1].sources), 0.0, name))
    return plan, index, ref


def _block_keys(lay, ck: Checkpoint, block: int) -> list[str]:
    prefix = lay.block_name(block, "")
    return [n[len(prefix):] for n in ck.names() if n.startswith(prefix)]


def _same(a: str, b: str) -> bool:
    return Path(a).resolve() == Path(b).resolve()


def stacked_config(config: dict, layers: int) -> dict:
    """``config`` with its layer count set to ``layers``."""
    out = dict(config)
    key = next((k for k in LAYER_KEYS if isinstance(config.get(k), int)), None)
    if key is None or num_layers(config) is None:
        raise WeightsmithError("the output config has no layer count (num_hidden_layers / n_layer) to set")
    out[key] = layers
    return out


def plan_slice_merge(recipe, *, dtype: str | None = None, allow_crimes: bool = False):
    """The engine's MergePlan for a slices recipe: one job per output tensor, each with its own inputs;
    every parameter resolved and checked, headers only."""
    from ..device import resolve_dtype
    from . import engine
    from .registry import PlanCheck, get_method

    where = "recipe"
    method = get_method(recipe.method)
    if method.whole_model or method.fn is None:
        raise WeightsmithError(f"{where}: method {method.name!r} merges whole models and cannot take 'slices'")
    compat = engine._compat(method, recipe, where)
    ignored = _check_slice_param_names(method, recipe, compat, where)
    cache: dict = {}

    def open_ckpt(path: str) -> Checkpoint:
        key = str(path)
        if key not in cache:
            cache[key] = engine._open(path, "model")
        return cache[key]

    takes_base = method.base in ("required", "optional")
    if method.base == "required" and not recipe.base_model and not all(s.base_model for s in recipe.slices):
        raise MissingOption("base_model", f"method {method.name!r} needs a base model")
    tensors, layers, ref = plan_slices(recipe.slices, recipe.base_model, recipe.parameters, open_ckpt, takes_base)
    everyone = list(cache.values())
    _check_widths(everyone, allow_crimes)
    out_dtype = resolve_dtype(dtype or recipe.out_dtype or recipe.dtype)
    math_dtype = resolve_dtype(recipe.dtype) if compat == "mergekit" else torch.float32
    jobs = []
    for st in tensors:
        n = len(st.inputs)
        if n < method.min_models or (method.max_models is not None and n > method.max_models):
            raise WeightsmithError(f"{where}: {st.name}: method {method.name!r} takes {method.min_models}"
                                   f"..{method.max_models or 'any'} model(s) besides the base per slice, got {n}")
        ordered = ([st.base] if st.base else []) + st.inputs
        infos = [open_ckpt(x.model).info(x.name) for x in ordered]
        shape, rows = _slice_shape(st.name, [tuple(i.shape) for i in infos])
        float_math = infos[0].torch_dtype.is_floating_point
        compute = math_dtype or _promoted(infos)
        jobs.append(engine.TensorJob(st.name, shape, out_dtype if (out_dtype and float_math) else infos[0].torch_dtype,
                                     _slice_kwargs(method, st, where, compat), rows, float_math,
                                     compute if float_math else infos[0].torch_dtype,
                                     [(open_ckpt(x.model), x.name) for x in ordered], st.base is not None))
    if method.validate is not None:
        method.validate(PlanCheck(method, sorted({x.model for st in tensors for x in st.inputs}),
                                  [(j.name, j.kwargs) for j in jobs if j.float_math], where, compat))
    card = {p.name: recipe.parameters.get(p.name, p.default) for p in method.params}
    card["layers"] = layers
    base = open_ckpt(recipe.base_model) if recipe.base_model else None
    models = [c for c in everyone if base is None or c.path != base.path]
    return engine.MergePlan(method, recipe, base, models, jobs, ref, False,
                            [f"{layers} layers stacked from {len(recipe.slices)} slice(s)"]
                            + [f"{', '.join(sorted(ignored))} ignored by {method.name} (as mergekit does)"] * bool(ignored),
                            card, compat,
                            stacked_config(ref.config or {}, layers))


def _check_slice_param_names(method, recipe, compat: str | None, where: str) -> set[str]:
    """Every parameter a slices recipe gives (top level, per slice, per source) must be the method's; keys
    mergekit ignores are dropped under compat: mergekit (returned) and refused otherwise."""
    from .registry import closest

    known = {p.name for p in method.params}
    scopes = [("parameters", recipe.parameters)]
    for i, s in enumerate(recipe.slices):
        scopes.append((f"slices[{i}]: parameters", s.parameters))
        scopes += [(f"slices[{i}]: sources[{j}]: parameters", src.parameters) for j, src in enumerate(s.sources)]
    ignored = set()
    for at, scope in scopes:
        for key in list(scope):
            if key in known:
                continue
            if key in method.mergekit_ignores and compat == "mergekit":
                ignored.add(key)
                del scope[key]
                continue
            hint = " (mergekit ignores it: {0} mergekit does the same)" if key in method.mergekit_ignores else ""
            raise needs_option(f"{where}: {at}: method {method.name!r} has no parameter {key!r}{closest(key, known)}; "
                               f"it takes {', '.join(sorted(known)) or 'none'}", hint, "compat")
    return ignored


def _slice_shape(name: str, shapes: list[tuple[int, ...]]) -> tuple[tuple[int, ...], int | None]:
    """A stacked tensor's shape, and the vocabulary rows it is cropped to (None: not cropped)."""
    from .engine import VOCAB_NAMES

    shape = shapes[0]
    if all(s == shape for s in shapes):
        return shape, None
    if not (all(len(s) == len(shape) and s[1:] == shape[1:] for s in shapes) and VOCAB_NAMES.search(name)):
        raise WeightsmithError(f"{name}: inputs have shapes {sorted(set(shapes))}; a slice merges layers of one shape")
    rows = min(s[0] for s in shapes)
    return (rows, *shape[1:]), rows


def _slice_kwargs(method, st, where: str, compat: str | None) -> dict:
    """The method's keyword arguments for one stacked tensor (a parameter without a keyword is only checked)."""
    from .registry import resolve

    kwargs: dict = {}
    for p in method.params:
        if p.scope == "global":
            v = first_setting(st.scopes, p.name, st.name, st.t, where)
            value = resolve(p, v, st.name, st.t, f"{where}: {st.name}", compat, v is not None)
        else:
            value = [resolve(p, v, x.name, st.t, f"{where}: model {x.model}: {st.name}", compat, v is not None)
                     for x in st.inputs for v in [first_setting(x.scopes, p.name, x.name, st.t, where)]]
        if p.keyword is not None:
            kwargs[p.keyword] = value
    kwargs.pop("trim", None)  # a stacked model has no whole task vector: TIES trims per tensor
    if method.inplace:
        kwargs["inplace"] = True
    return kwargs


def _promoted(infos) -> torch.dtype:
    dt = infos[0].torch_dtype
    for i in infos[1:]:
        dt = torch.promote_types(dt, i.torch_dtype)
    return dt


def _check_widths(ckpts: list[Checkpoint], allow_crimes: bool) -> None:
    """Stacked layers must agree on everything but the layer count."""
    from .engine import ARCH_KEYS

    ref = ckpts[0]
    for c in ckpts[1:]:
        for key in ARCH_KEYS:
            if key in LAYER_KEYS:
                continue
            if (ref.config or {}).get(key) != (c.config or {}).get(key) and not allow_crimes:
                problem = (f"{c.path}: config {key} = {(c.config or {}).get(key)!r} but {ref.path} has "
                           f"{(ref.config or {}).get(key)!r}")
                raise needs_option(problem, "; {0} stacks them anyway", "allow_crimes")


MODULE_KEYS = {"slices", "models", "parameters"}


def single_module(data: dict, source: str) -> dict:
    """A recipe's ``modules:`` form for a one-module model (mergekit names that module ``default``) as
    the plain form: its ``slices`` or ``models`` at the top, its ``parameters`` over the recipe's.
    Models of several modules (a vision tower beside a language model) are refused by name."""
    modules = data["modules"]
    if not isinstance(modules, dict) or set(modules) != {"default"}:
        names = sorted(modules) if isinstance(modules, dict) else modules
        raise WeightsmithError(f"{source}: 'modules' {names!r}: only the one-module form (modules: {{default: ...}}) "
                               "is supported; per-module recipes of multi-module models are not")
    for key in ("models", "slices"):
        if key in data:
            raise WeightsmithError(f"{source}: give '{key}' inside modules.default or at the top, not both")
    module = modules["default"]
    where = f"{source}: modules.default"
    if not isinstance(module, dict):
        raise WeightsmithError(f"{where}: expected a mapping with 'slices' or 'models'")
    refuse_unknown(module, MODULE_KEYS, where)
    if ("slices" in module) == ("models" in module):
        raise WeightsmithError(f"{where}: give exactly one of 'slices' or 'models'")
    out = {k: v for k, v in data.items() if k != "modules"}
    out.update({k: module[k] for k in ("slices", "models") if k in module})
    out["parameters"] = {**(data.get("parameters") or {}), **parameters_of(module, where)}
    return out
