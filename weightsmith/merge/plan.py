"""The merge planner: a recipe becomes a ``MergePlan`` (one ``TensorJob`` per output tensor, with its inputs and
every parameter resolved and checked) from headers and configs alone; no tensor is read.

Every recipe takes one path, as mergekit plans it: ``normalise`` turns a ``models:`` recipe into one slice
over all the layers of its models, then ``plan_slice`` lists each slice's output tensors and their inputs
and ``plan_tensor`` gives each its shape, dtypes and the method's keyword arguments. A parameter is looked
up, first found wins: the input's own ``parameters``, the slice's, the recipe's; its layer gradient runs
over the slice's layers (t = j / (n−1), 1 for a one-layer slice) and is 0 outside the layers. Stacked
slices (``slices:``) take the tensors outside the layers (embeddings) from the first slice's sources, the
head and final norm from the last slice's.
"""
from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path

import torch

from ..checkpoint import Checkpoint, detect_layout
from ..checkpoint.layout import num_layers
from ..device import resolve_dtype
from ..errors import MissingOption, WeightsmithError, needs_option
from .recipe import Recipe, Slice, SliceSource, resolve_recipe
from .registry import Method, PlanCheck, closest, get_method, resolve, resolve_globals
from .settings import first_setting
from .tokenizer import VOCAB_NAMES, attach_vocabulary

ADAPTER_WEIGHTS = "adapter_model.safetensors"
ADAPTER_CONFIG = "adapter_config.json"
# Config keys that must agree for tensors to mean the same thing; differing needs allow_crimes.
ARCH_KEYS = ("model_type", "architectures", "hidden_size", "num_hidden_layers", "num_attention_heads",
             "num_key_value_heads", "intermediate_size", "n_embd", "n_layer", "n_head")
LAYER_KEYS = ("num_hidden_layers", "n_layer", "num_layers")  # may differ between stacked models


@dataclass
class TensorJob:
    name: str
    shape: tuple[int, ...]
    dtype: torch.dtype
    kwargs: dict
    rows: int | None = None  # crop the vocabulary axis to this many rows
    float_math: bool = True
    compute: torch.dtype = torch.float32  # the arithmetic's dtype (not float32 only under compat: mergekit)
    inputs: list = field(default_factory=list)  # [(Checkpoint, tensor name)], the base first when ``base_in``
    base_in: bool = False
    prepare: object = None  # applied to the loaded inputs (vocabulary rows re-indexed to the output tokenizer)


@dataclass
class MergePlan:
    method: Method
    recipe: Recipe
    jobs: list[TensorJob]
    reference: Checkpoint  # whose config and side files the output takes
    adapter: bool = False
    notes: list[str] = field(default_factory=list)
    card_parameters: dict = field(default_factory=dict)
    compat: str | None = None
    config: dict | None = None  # the output config when it is not the reference's (layer stacking)
    vocabulary: object = None  # tokenizer.OutputVocabulary when the recipe builds the output tokenizer


@dataclass
class Input:
    ckpt: Checkpoint
    name: str  # the tensor's name in that checkpoint
    scopes: list[dict]  # its per-model parameter scopes, highest precedence first


@dataclass
class OutTensor:
    """One output tensor of a slice: its inputs (``base`` apart when the method takes it) and ``peers``, every
    tensor it must agree with in shape and whose dtypes set its own (its inputs, and a base the method ignores)."""
    name: str
    inputs: list[Input]
    base: Input | None
    t: float
    scopes: list[dict]  # global parameter scopes, highest precedence first
    peers: list[Input]


def plan_merge(recipe: Recipe, *, dtype: str | None = None, allow_crimes: bool = False) -> MergePlan:
    """Open headers, check architectures, names, shapes and every parameter for every tensor; read no tensor.

    ``dtype`` (the output dtype a run asks for) overrides the recipe's; the arithmetic's dtype is float32,
    or the recipe's ``dtype`` under compat: mergekit."""
    get_method(recipe.method)  # an unknown method is refused before any model is fetched
    recipe, method, card = _method_of(resolve_recipe(recipe))
    compat = _compat(method, recipe)
    stacked = recipe.slices is not None
    slices = normalise(recipe, method)
    notes = check_param_names(method, recipe, slices, stacked, compat)
    opened = _open_all(recipe, slices)
    check_architectures(list(opened.values()), allow_crimes, LAYER_KEYS if stacked else ())
    reference = opened[_key(recipe.base_model or slices[0].sources[0].model)]
    out: list[OutTensor] = []
    layers = 0
    for i, s in enumerate(slices):
        found, n = plan_slice(s, i, recipe, method, opened, reference, stacked, layers, i == len(slices) - 1)
        out += found
        layers += n
    jobs = [plan_tensor(method, t, recipe, compat, dtype, stacked, notes) for t in out]
    if method.validate is not None:
        models = list(dict.fromkeys(str(x.ckpt.path) for t in out for x in t.inputs))
        method.validate(PlanCheck(method, models, [(j.name, j.kwargs) for j in jobs if j.float_math], "recipe", compat))
    card = card or {p.name: recipe.parameters.get(p.name, p.default) for p in method.params}
    if compat == "mergekit" and recipe.dtype and recipe.out_dtype and not dtype:
        notes.append(f"arithmetic in {recipe.dtype}, written as {recipe.out_dtype} (as mergekit)")
    if stacked:
        card["layers"] = layers
        notes.insert(0, f"{layers} layers stacked from {len(slices)} slice(s)")
    adapter = not stacked and reference.config is None and (reference.path / ADAPTER_WEIGHTS).is_file()
    return attach_vocabulary(MergePlan(method, recipe, jobs, reference, adapter, notes, card, compat,
                                       stacked_config(reference.config or {}, layers) if stacked else None))


def _method_of(recipe: Recipe) -> tuple[Recipe, Method, dict]:
    """The method that runs (after a ``rewrite`` hook turned the recipe into another method's, for a ``models:``
    recipe), and the model card's parameters the rewrite gave."""
    method = get_method(recipe.method)
    card: dict = {}
    if method.rewrite is not None and recipe.slices is None:
        check_param_names(method, recipe, as_slices(recipe, method), False, _compat(method, recipe))
        recipe, card = method.rewrite(recipe, resolve_globals(method, recipe, "recipe"), "recipe")
        method = get_method(recipe.method)
    if method.fn is None:
        raise WeightsmithError(f"recipe: method {method.name!r} merges whole models"
                               + (" and cannot take 'slices'" if recipe.slices is not None else ""))
    return recipe, method, card


def _compat(method: Method, recipe: Recipe) -> str | None:
    p = method.param("compat")
    return resolve(p, recipe.parameters.get("compat"), "", 0.0, "recipe", None, True) if p else None


def _key(path) -> str:
    return str(Path(path).resolve())


def as_slices(recipe: Recipe, method: Method) -> list[Slice]:
    """The recipe's slices; a ``models:`` recipe is one slice over every tensor of its models, the base among
    them when the method takes it (as mergekit's normalize_config)."""
    if recipe.slices is not None:
        return recipe.slices
    sources = [SliceSource(m.path, None, m.parameters) for m in recipe.models]
    base = recipe.base_model
    if base is not None and method.takes_base and not any(_key(s.model) == _key(base) for s in sources):
        sources.insert(0, SliceSource(base, None, {}))
    return [Slice(sources, base)]


def normalise(recipe: Recipe, method: Method) -> list[Slice]:
    """``as_slices``, checked: each slice has a base where the method needs one and as many models besides the
    base as the method takes. Opens nothing."""
    slices = as_slices(recipe, method)
    where = "slices[{}]: " if recipe.slices is not None else ""
    for i, s in enumerate(slices):
        base = s.base_model or recipe.base_model
        if method.base == "required" and base is None:
            raise MissingOption("base_model", f"method {method.name!r} needs a base model")
        n = len(s.sources) - (method.takes_base and base is not None and any(_key(x.model) == _key(base)
                                                                      for x in s.sources))
        at = where.format(i)
        if n < method.min_models:
            raise WeightsmithError(f"{at}method {method.name!r} needs at least {method.min_models} model(s) besides "
                                   f"the base, got {n}")
        if method.max_models is not None and n > method.max_models:
            raise WeightsmithError(f"{at}method {method.name!r} takes at most {method.max_models} model(s) besides "
                                   f"the base, got {n}")
    return slices


def check_param_names(method: Method, recipe: Recipe, slices: list[Slice], stacked: bool, compat: str | None
                      ) -> list[str]:
    """Every parameter a recipe gives (top level, per slice, per model) must be the method's, and a per-model one
    of a ``models:`` entry must be per-model; keys mergekit ignores are dropped with a note under
    compat: mergekit and refused otherwise."""
    known = {p.name for p in method.params}
    scopes = [("parameters", recipe.parameters, False)]
    for i, s in enumerate(slices):
        at = f"slices[{i}]: " if stacked else ""
        scopes += [(f"{at}parameters", s.parameters, False)] * stacked
        scopes += [(f"{at}sources[{j}]: parameters" if stacked else f"model {src.model}", src.parameters, not stacked)
                   for j, src in enumerate(s.sources)]
    ignored: set[str] = set()
    for at, scope, per_model in scopes:
        for key in list(scope):
            p = method.param(key)
            if p is None and key in method.mergekit_ignores and compat == "mergekit":
                ignored.add(key)
                del scope[key]
            elif p is None:
                problem = (f"recipe: {at}: method {method.name!r} has no parameter {key!r}{closest(key, known)}; "
                           f"it takes {', '.join(sorted(known)) or 'none'}")
                if key in method.mergekit_ignores:
                    raise needs_option(problem, " (mergekit accepts and ignores it: {0} mergekit does the same)",
                                       "compat")
                raise WeightsmithError(problem)
            elif per_model and p.scope != "model":
                raise WeightsmithError(f"recipe: {at}: {key!r} is a global parameter of {method.name!r}; give it "
                                       "under the recipe's top-level parameters")
    return [f"per-model {', '.join(sorted(ignored))} ignored by {method.name} (as mergekit does)"] * bool(ignored)


def _open(path: str, what: str) -> Checkpoint:
    if not Path(path).is_dir():
        raise WeightsmithError(f"{what} {path}: folder not found")
    return Checkpoint(path)


def _open_all(recipe: Recipe, slices: list[Slice]) -> dict[str, Checkpoint]:
    """Every input's checkpoint by resolved path, the base first (headers only)."""
    opened: dict[str, Checkpoint] = {}
    bases = [recipe.base_model] + [s.base_model for s in slices]
    for path, what in [(b, "base_model") for b in bases if b] + [(x.model, "model") for s in slices
                                                                for x in s.sources]:
        if _key(path) not in opened:
            opened[_key(path)] = _open(path, what)
    return opened


def check_architectures(ckpts: list[Checkpoint], allow_crimes: bool, ignore: tuple[str, ...] = ()) -> None:
    """Inputs must share an architecture (config keys ``ARCH_KEYS`` but ``ignore``; adapters their rank, targets
    and base), unless ``allow_crimes``."""
    ref = ckpts[0]
    for c in ckpts[1:]:
        if (ref.config is None) != (c.config is None):
            raise WeightsmithError(f"{c.path}: one input has config.json and another has not; merge like with like")
        if ref.config is None:
            _check_adapters(ref, c, allow_crimes)
            continue
        for key in ARCH_KEYS:
            if key not in ignore and ref.config.get(key) != c.config.get(key) and not allow_crimes:
                raise needs_option(
                    f"{c.path}: config {key} = {c.config.get(key)!r} but {ref.path} has {ref.config.get(key)!r}; "
                    "these models do not share an architecture", " ({0} merges them anyway)", "allow_crimes")


def _check_adapters(ref: Checkpoint, c: Checkpoint, allow_crimes: bool) -> None:
    a, b = (ref.path / ADAPTER_CONFIG), (c.path / ADAPTER_CONFIG)
    if not (a.is_file() and b.is_file()) or allow_crimes:
        return
    from ..checkpoint.adapters import read_adapter_config

    ka, kb = read_adapter_config(ref.path), read_adapter_config(c.path)
    for key in ("r", "target_modules", "base_model_name_or_path"):
        if ka.get(key) != kb.get(key):
            raise needs_option(f"{c.path}: adapter {key} {kb.get(key)!r} differs from {ref.path}'s {ka.get(key)!r}",
                               "; {0} merges them anyway", "allow_crimes")


def plan_slice(s: Slice, index: int, recipe: Recipe, method: Method, opened: dict[str, Checkpoint],
               reference: Checkpoint, stacked: bool, start: int, last: bool) -> tuple[list[OutTensor], int]:
    """A slice's output tensors, in output order, and the layers it stacks. A stacked slice's layers become output
    layers ``start``, ``start + 1``, ...; the first slice also gives the tensors outside the layers that come before
    them (embeddings), the ``last`` one those after them (final norm, head)."""
    base_path = s.base_model or recipe.base_model
    base_src = next((x for x in s.sources if method.takes_base and base_path and _key(x.model) == _key(base_path)),
                    None)
    if stacked and method.takes_base and base_path is not None and base_src is None:
        raise WeightsmithError(f"slice with sources {[x.model for x in s.sources]}: its base_model {base_path} "
                               "is not among them; list it as a source with the same layer_range")
    others = [x for x in s.sources if x is not base_src]
    unused = [] if stacked or base_src is not None or base_path is None else [opened[_key(base_path)]]

    def out(name: str, names: list[str], t: float) -> OutTensor:
        def item(x: SliceSource, nm: str) -> Input:
            own = [y.parameters for y in s.sources if y.model == x.model]
            return Input(opened[_key(x.model)], nm, [*own, s.parameters, recipe.parameters])
        items = {id(x): item(x, nm) for x, nm in zip(s.sources, names)}
        base = items[id(base_src)] if base_src is not None else None
        inputs = [items[id(x)] for x in others]
        peers = [Input(c, name, []) for c in unused] + ([base] if base else []) + inputs
        return OutTensor(name, inputs, base, t, [s.parameters, recipe.parameters], peers)

    if not stacked:
        everyone = list(opened.values())
        _check_same_names(everyone, reference)
        depth = _depths(reference)
        return [out(n, [n] * len(s.sources), depth[n]) for n in reference.names()], 0
    return _stacked_slice(s, index, opened, reference, out, start, last)


def _stacked_slice(s: Slice, index: int, opened: dict[str, Checkpoint], reference: Checkpoint, out, start: int,
                   last: bool) -> tuple[list[OutTensor], int]:
    layouts = {k: detect_layout(c.config, c.names(), str(c.path)) for k, c in opened.items()}
    for j, src in enumerate(s.sources):
        n = layouts[_key(src.model)].num_blocks
        if src.layers[1] > n:
            raise WeightsmithError(f"slices[{index}]: sources[{j}]: layer_range {list(src.layers)} reaches past "
                                   f"{src.model}'s {n} layers")
    out_layout = layouts[_key(reference.path)]
    outside = [n for n in reference.names() if out_layout.block_of(n) is None]
    head = set(out_layout.head) | set(out_layout.final_norm)
    found: list[OutTensor] = []
    if index == 0:
        found += [out(n, [n] * len(s.sources), 0.0) for n in outside if n not in head]
    lead = s.sources[0]
    prefix = layouts[_key(lead.model)].block_name(lead.layers[0], "")
    keys = [n[len(prefix):] for n in opened[_key(lead.model)].names() if n.startswith(prefix)]
    length = lead.layers[1] - lead.layers[0]
    for j in range(length):
        for key in keys:
            names = [layouts[_key(x.model)].block_name(x.layers[0] + j, key) for x in s.sources]
            for x, nm in zip(s.sources, names):
                if nm not in opened[_key(x.model)]:
                    raise WeightsmithError(f"{x.model}: has no tensor {nm!r} (slice layer {x.layers[0] + j})")
            found.append(out(out_layout.block_name(start + j, key), names, j / (length - 1) if length > 1 else 1.0))
    if last:
        found += [out(n, [n] * len(s.sources), 0.0) for n in outside if n in head]
    return found, length


def _check_same_names(everyone: list[Checkpoint], reference: Checkpoint) -> None:
    ref_names = reference.names()
    for c in everyone:
        missing = [n for n in ref_names if n not in c]
        extra = [n for n in c.names() if n not in reference]
        if missing:
            raise WeightsmithError(f"{c.path}: has no tensor {missing[0]!r} (present in {reference.path})"
                                   + (f" and {len(missing) - 1} more" if len(missing) > 1 else ""))
        if extra:
            raise WeightsmithError(f"{c.path}: tensor {extra[0]!r} is not in {reference.path}")


def _depths(ref: Checkpoint) -> dict[str, float]:
    """Relative depth t of every tensor (block i of L -> i/(L-1)); non-block tensors get 0 as in mergekit."""
    names = ref.names()
    try:
        layout = detect_layout(ref.config, names, str(ref.path))
        block_of, n = layout.block_of, layout.num_blocks
    except WeightsmithError:
        pat = re.compile(r"\.(\d+)\.")

        def block_of(name: str) -> int | None:
            m = pat.search(name)
            return int(m.group(1)) if m else None
        found = [b for b in map(block_of, names) if b is not None]
        n = max(found) + 1 if found else 0
    out = {}
    for name in names:
        b = block_of(name)
        out[name] = 0.0 if b is None else (b / (n - 1) if n > 1 else 1.0)
    return out


def plan_tensor(method: Method, t: OutTensor, recipe: Recipe, compat: str | None, dtype: str | None, stacked: bool,
                notes: list[str]) -> TensorJob:
    """One output tensor's job: its shape (vocabulary rows cropped to the common ones), the output and arithmetic
    dtypes and the method's keyword arguments."""
    shape, rows = _common_shape(t.name, t.peers, notes)
    in_dtype = t.peers[0].ckpt.info(t.peers[0].name).torch_dtype
    float_math = in_dtype.is_floating_point
    out_dtype = resolve_dtype(dtype or recipe.out_dtype or recipe.dtype)
    compute = resolve_dtype(recipe.dtype) if compat == "mergekit" else torch.float32
    compute = compute or _promoted(t.peers)
    kwargs = _kwargs(method, t, compat)
    if stacked:
        kwargs.pop("trim", None)  # a stacked model has no whole task vector: TIES trims per tensor
    ordered = ([t.base] if t.base else []) + t.inputs
    return TensorJob(t.name, shape, out_dtype if (out_dtype and float_math) else in_dtype, kwargs, rows, float_math,
                     compute if float_math else in_dtype, [(x.ckpt, x.name) for x in ordered], t.base is not None)


def _common_shape(name: str, peers: list[Input], notes: list[str]) -> tuple[tuple[int, ...], int | None]:
    """The output shape of tensor ``name`` and the vocabulary rows it is cropped to (None: not cropped)."""
    shapes = [tuple(x.ckpt.info(x.name).shape) for x in peers]
    shape, rows = shapes[0], None
    if any(s != shape for s in shapes):
        same_tail = all(len(s) == len(shape) and s[1:] == shape[1:] for s in shapes)
        if not (same_tail and VOCAB_NAMES.search(name)):
            odd = next(x for x, s in zip(peers, shapes) if s != shape)
            raise WeightsmithError(f"{odd.ckpt.path}: tensor {odd.name!r} has shape {list(odd.ckpt.info(odd.name).shape)}"
                                   f" but {peers[0].ckpt.path} has {list(shape)}")
        rows = min(s[0] for s in shapes)
        shape = (rows, *shape[1:])
        notes.append(f"{name}: vocabulary rows differ {sorted({s[0] for s in shapes})}; cropped to the first {rows}")
    return shape, rows


def _kwargs(method: Method, t: OutTensor, compat: str | None) -> dict:
    """The method's keyword arguments for one output tensor: every parameter resolved and checked (one without a
    keyword only checked)."""
    kwargs: dict = {}
    for p in method.params:
        if p.scope == "global":
            where = f"recipe: {t.name}"
            v = first_setting(t.scopes, p.name, t.name, t.t, where)
            value = resolve(p, v, t.name, t.t, where, compat, v is not None)
        else:
            value = []
            for x in t.inputs:
                where = f"recipe: model {x.ckpt.path}: {t.name}"
                v = first_setting(x.scopes, p.name, x.name, t.t, where)
                value.append(resolve(p, v, x.name, t.t, where, compat, v is not None))
        if p.keyword is not None:
            kwargs[p.keyword] = value
    if method.inplace:
        kwargs["inplace"] = True
    return kwargs


def _promoted(peers: list[Input]) -> torch.dtype:
    """mergekit's compute dtype when the recipe gives none: the inputs' dtypes promoted."""
    dt = peers[0].ckpt.info(peers[0].name).torch_dtype
    for x in peers[1:]:
        dt = torch.promote_types(dt, x.ckpt.info(x.name).torch_dtype)
    return dt


def stacked_config(config: dict, layers: int) -> dict:
    """``config`` with its layer count set to ``layers``."""
    out = dict(config)
    key = next((k for k in LAYER_KEYS if isinstance(config.get(k), int)), None)
    if key is None or num_layers(config) is None:
        raise WeightsmithError("the output config has no layer count (num_hidden_layers / n_layer) to set")
    out[key] = layers
    return out
