"""Merge recipes: mergekit-style YAML (models or slices, parameters, base_model, dtype, merge_method) or CLI
flags, read into a ``Recipe``; nothing is opened here (``resolve_recipe`` turns model references into folders).

Parameter values are kept as written; ``settings.evaluate_setting`` reads them for a tensor as mergekit does
(a scalar, a layer gradient, or ``{filter, value}`` entries). A slice lists sources (a model and a
``layer_range`` [start, end)) of equal length; the planner stacks them.
"""
from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from ..errors import MissingOption, OptionError, WeightsmithError

KNOWN_KEYS = {"merge_method", "models", "base_model", "parameters", "dtype", "tokenizer_source", "out_dtype",
              "name", "chat_template", "tokenizer", "slices"}
MODEL_KEYS = {"model", "parameters"}
# Top-level keys carried on the recipe for the stages that handle them (tokenizer, chat template, name).
OPTION_KEYS = ("tokenizer_source", "chat_template", "tokenizer", "name")
SLICE_KEYS = {"sources", "base_model", "parameters"}
SOURCE_KEYS = {"model", "layer_range", "parameters"}


def refuse_unknown(keys, known, where: str) -> None:
    """An unknown key is an error naming it and the closest known one."""
    import difflib

    for key in keys:
        if key not in known:
            match = difflib.get_close_matches(str(key), sorted(known), n=1, cutoff=0.6)
            hint = f" (did you mean {match[0]!r}?)" if match else ""
            raise WeightsmithError(f"{where}: unknown key {key!r}{hint}; known: {', '.join(sorted(known))}")


def model_entry(entry, known, where: str, needs: str) -> dict:
    """A list entry of a recipe that names a model: a mapping holding 'model' and only ``known`` keys (``needs``
    says what an entry must hold)."""
    if isinstance(entry, dict):
        refuse_unknown(entry, known, where)
    if not isinstance(entry, dict) or "model" not in entry:
        raise WeightsmithError(f"{where}: {needs}")
    return entry


def model_entries(data: dict, key: str, known, where: str, form: str, needs: str) -> list[tuple[str, dict]]:
    """``data[key]``, a non-empty list of ``form`` entries, each checked by ``model_entry``, with where each is."""
    raw = data.get(key)
    if not isinstance(raw, list) or not raw:
        raise WeightsmithError(f"{where}: '{key}' must be a non-empty list of {form}")
    return [(f"{where}: {key}[{i}]", model_entry(e, known, f"{where}: {key}[{i}]", needs)) for i, e in enumerate(raw)]


def parameters_of(entry: dict, where: str) -> dict:
    """An entry's ``parameters`` mapping (empty when absent)."""
    params = entry.get("parameters") or {}
    if not isinstance(params, dict):
        raise WeightsmithError(f"{where}: 'parameters' must be a mapping")
    return dict(params)


@dataclass
class ModelEntry:
    path: str
    parameters: dict = field(default_factory=dict)


@dataclass
class SliceSource:
    model: str
    layers: tuple[int, int] | None  # [start, end); None: every tensor of the model (a ``models:`` entry)
    parameters: dict = field(default_factory=dict)


@dataclass
class Slice:
    sources: list[SliceSource]
    base_model: str | None = None
    parameters: dict = field(default_factory=dict)

    @property
    def length(self) -> int:
        return self.sources[0].layers[1] - self.sources[0].layers[0]


@dataclass
class Recipe:
    method: str
    models: list[ModelEntry]
    base_model: str | None = None
    parameters: dict = field(default_factory=dict)
    dtype: str | None = None  # mergekit's compute dtype (used under compat: mergekit), and the output's unless out_dtype
    text: str | None = None
    out_dtype: str | None = None
    options: dict = field(default_factory=dict)  # OPTION_KEYS given in the recipe
    slices: list | None = None  # layer stacking (``Slice``), instead of ``models``

    @property
    def inputs(self) -> list[str]:
        """Every distinct folder the recipe reads, base first."""
        paths = ([self.base_model] if self.base_model else []) + [m.path for m in self.models]
        for s in self.slices or []:
            paths += ([s.base_model] if s.base_model else []) + [src.model for src in s.sources]
        return list(dict.fromkeys(paths))

    def to_yaml(self) -> str:
        data: dict = {"merge_method": self.method}
        if self.base_model:
            data["base_model"] = self.base_model
        data["models"] = [{"model": m.path, **({"parameters": m.parameters} if m.parameters else {})} for m in self.models]
        if self.parameters:
            data["parameters"] = self.parameters
        if self.dtype:
            data["dtype"] = self.dtype
        if self.out_dtype:
            data["out_dtype"] = self.out_dtype
        data.update(self.options)
        return yaml.safe_dump(data, sort_keys=False)


def _ref_text(value, where: str) -> str:
    """A model reference's text (``$VAR`` and ``~`` expand so one recipe serves several machines); mergekit's
    ``{model: X, lora: Y}`` form is ``X+Y``. Only the syntax is checked here."""
    from ..checkpoint.sources import parse_ref

    if isinstance(value, dict) and isinstance(value.get("model"), str):
        refuse_unknown(value, {"model", "lora", "override_architecture"}, where)
        if value.get("override_architecture"):
            raise WeightsmithError(f"{where}: 'override_architecture' is not supported; give models of one architecture")
        lora = value.get("lora")
        if lora is not None and (not isinstance(lora, str) or not lora):
            raise WeightsmithError(f"{where}: 'lora' must name an adapter (a folder or a Hub repo), got {lora!r}")
        value = value["model"] + (f"+{lora}" if lora else "")
    if not isinstance(value, str) or not value:
        raise WeightsmithError(f"{where}: expected a model (a folder, org/name[@revision] or model+adapter), "
                               f"got {value!r}")
    text = os.path.expanduser(os.path.expandvars(value))
    try:
        parse_ref(text)
    except WeightsmithError as exc:
        raise WeightsmithError(f"{where}: {exc}") from None
    return text


def _resolver(root: Path | None):
    """``model_ref(value, where)`` giving the folder a reference resolves to (``checkpoint.sources``)."""
    from ..checkpoint import sources

    def model_ref(value, where: str) -> str:
        return str(sources.resolve_model(sources.rooted(_ref_text(value, where), root), what=where))
    return model_ref


_model_ref = _resolver(None)


def parse_recipe(text: str, source: str = "recipe", root: str | Path | None = None) -> Recipe:
    """Parse mergekit YAML text into a Recipe (nothing is opened or fetched here: ``resolve_recipe`` turns its model
    references into folders). Relative paths that exist beside the recipe (``root``) are taken from there."""
    from ..checkpoint.sources import rooted

    base = Path(root) if root is not None else None
    return _parse(text, source, lambda value, where: rooted(_ref_text(value, where), base))


def resolve_recipe(recipe: Recipe) -> Recipe:
    """``recipe`` with every model reference (``models``, ``base_model``, ``slices`` sources and bases) resolved to
    its folder (``checkpoint.sources``: a Hub name is read from the cache or downloaded). Folders stay as they are;
    ``recipe.text`` keeps the names as written."""
    import copy

    out = copy.deepcopy(recipe)
    for i, m in enumerate(out.models):
        m.path = _model_ref(m.path, f"recipe: models[{i}]")
    if out.base_model is not None:
        out.base_model = _model_ref(out.base_model, "recipe: base_model")
    for i, s in enumerate(out.slices or []):
        s.base_model = _model_ref(s.base_model, f"recipe: slices[{i}]: base_model") if s.base_model else None
        for j, src in enumerate(s.sources):
            src.model = _model_ref(src.model, f"recipe: slices[{i}]: sources[{j}]")
    return out


def yaml_mapping(text: str, source: str, holding: str) -> dict:
    """The mapping a YAML text holds (aliases and size budgeted, ``checkpoint.textfile.load_yaml``), or an error
    naming ``source`` and what it should hold."""
    from ..checkpoint.textfile import load_yaml

    try:
        data = load_yaml(text)
    except yaml.YAMLError as exc:
        raise WeightsmithError(f"{source}: not valid YAML ({exc})") from None
    if not isinstance(data, dict):
        raise WeightsmithError(f"{source}: expected a mapping with {holding}")
    return data


def _parse(text: str, source: str, model_ref) -> Recipe:
    data = yaml_mapping(text, source, "merge_method and models")
    if "modules" in data:
        data = single_module(data, source)
    if "slices" in data and "models" in data:
        raise WeightsmithError(f"{source}: give 'models' or 'slices', not both")
    refuse_unknown(data, KNOWN_KEYS, source)
    method = data.get("merge_method")
    if not isinstance(method, str):
        raise WeightsmithError(f"{source}: 'merge_method' is missing (e.g. merge_method: ties)")
    slices = parse_slices(data["slices"], source, model_ref) if "slices" in data else None
    models = [] if slices is not None else [
        ModelEntry(model_ref(m["model"], at), parameters_of(m, at))
        for at, m in model_entries(data, "models", MODEL_KEYS, source, "{model: PATH, parameters: {...}}",
                                   "each entry needs 'model: PATH'")]
    base = data.get("base_model")
    params = data.get("parameters") or {}
    if not isinstance(params, dict):
        raise WeightsmithError(f"{source}: 'parameters' must be a mapping")
    dtypes = {}
    for key in ("dtype", "out_dtype"):
        value = data.get(key)
        if value is not None and not isinstance(value, str):
            raise WeightsmithError(f"{source}: '{key}' must be a name such as float32, bfloat16 or float16, not {value!r}")
        dtypes[key] = value
    return Recipe(method, models, model_ref(base, f"{source}: base_model") if base is not None else None,
                  dict(params), dtypes["dtype"], text, dtypes["out_dtype"],
                  {k: data[k] for k in OPTION_KEYS if k in data}, slices)


def load_recipe(path: str | Path) -> Recipe:
    path = Path(path)
    if not path.is_file():
        raise WeightsmithError(f"{path}: recipe file not found")
    from ..checkpoint.textfile import read_text_file

    return parse_recipe(read_text_file(path, "recipe"), str(path), path.resolve().parent)


def recipe_from_flags(method: str, models: list[str], base: str | None = None, per_model: dict | None = None,
                      parameters: dict | None = None, dtype: str | None = None) -> Recipe:
    """The recipe a command line describes. ``per_model`` values given once apply to every model,
    given once per model they pair up in order; ``parameters`` are global (``None`` values dropped)."""
    if not models:
        raise MissingOption("models", "no models to merge: give a recipe or one model per input")
    entries = [ModelEntry(_ref_text(m, "model")) for m in models]
    base = _ref_text(base, "base_model") if base is not None else None
    params = {k: v for k, v in (parameters or {}).items() if v is not None}
    for key, values in (per_model or {}).items():
        if not values:
            continue
        if len(values) == 1:
            params[key] = values[0]
        elif len(values) == len(models):
            for e, v in zip(entries, values):
                e.parameters[key] = v
        else:
            raise OptionError(key, f"given {len(values)} times for {len(models)} models; give it once (all models) "
                                   "or once per model")
    return Recipe(method, entries, base, params, dtype)


def parse_param(text: str) -> tuple[str, object]:
    """'key=value' (the command line's extra parameters), the value read as YAML (numbers, lists, true/false)."""
    from ..checkpoint.textfile import load_yaml

    key, sep, value = text.partition("=")
    if not sep or not key.strip():
        raise OptionError("param", f"{text!r}: write KEY=VALUE, e.g. lambda=0.7")
    try:
        return key.strip(), load_yaml(value)
    except yaml.YAMLError:
        raise OptionError("param", f"{text!r}: value is not valid YAML") from None


# -- layer stacking: mergekit's ``slices:`` and one-module ``modules:`` forms ----------------------

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
        sources = []
        for at, src in model_entries(s, "sources", SOURCE_KEYS, where, "{model, layer_range}",
                                     "each source needs 'model: PATH' and 'layer_range: [start, end]'"):
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
