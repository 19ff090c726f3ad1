"""Pipeline YAML: parsing, reference resolution and whole-pipeline validation before any stage runs.

    workdir: out/demo            # optional; --workdir overrides; relative to the YAML file
    zoo: tiny                    # size used by zoo: references
    vars: {data: zoo:data/prose.valid}
    stages:
      - name: merged             # output folder: WORKDIR/merged
        stage: merge
        inputs: [zoo:ft-prose, zoo:ft-asyncio]   # or input: X, or from: NAME; default: last model written
        params: {method: linear}
      - name: scores
        stage: eval
        inputs: [zoo:base, "${stages.merged.output}"]
        params: {data: "${vars.data}", max_tokens: 2000}

References: ``${vars.NAME}``, ``${stages.NAME.output}``, ``${workdir}``; ``zoo:MODEL``, ``zoo:tokenizer`` and
``zoo:data/DOMAIN.SPLIT`` name the in-house zoo's folders and files; other strings are paths relative to the YAML.
"""
from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from ..checkpoint.textfile import load_yaml, read_text_file
from ..checkpoint.sources import parse_ref, resolve_model, rooted
from ..errors import WeightsmithError, needs_option
from .stages import STAGES, accepts

NAME = re.compile(r"^[A-Za-z0-9][\w.-]*$")
REF = re.compile(r"\$\{([^}]*)\}")
TOP_KEYS = {"name", "workdir", "zoo", "vars", "stages", "description"}
STAGE_KEYS = {"name", "stage", "input", "inputs", "from", "params"}


@dataclass
class StageEntry:
    name: str
    stage: str
    inputs: list[str]  # resolved paths (strings)
    params: dict
    raw: dict  # as written in the YAML, for the recipe shown in model cards
    upstream: list[str] = field(default_factory=list)  # names of stages whose outputs it reads

    def where(self, key: str | None = None) -> str:
        return f"stage {self.name!r}" + (f", key {key!r}" if key else "")


@dataclass
class Pipeline:
    name: str
    source: Path
    workdir: Path
    stages: list[StageEntry]
    text: str

    def output(self, name: str) -> Path:
        return self.workdir / name


MODEL_PARAMS = ("base_model", "tokenizer")  # parameters that name a model: a folder, a Hub name or model+adapter


class _Resolver:
    def __init__(self, base: Path, workdir: Path, zoo_size: str, variables: dict):
        self.base, self.workdir, self.zoo_size, self.vars = base, workdir, zoo_size, variables
        self.outputs: dict[str, Path] = {}
        self._zoo = None

    def zoo(self):
        if self._zoo is None:
            from ..zoo import build
            self._zoo = build(self.zoo_size)
        return self._zoo

    def text(self, value: str, where: str, used: list[str]) -> str:
        def sub(m: re.Match) -> str:
            parts = m.group(1).strip().split(".")
            if parts == ["workdir"]:
                return str(self.workdir)
            if len(parts) == 2 and parts[0] == "vars":
                if parts[1] not in self.vars:
                    raise WeightsmithError(f"{where}: ${{vars.{parts[1]}}} is not defined under vars: "
                                           f"(defined: {', '.join(self.vars) or 'none'})")
                return str(self.vars[parts[1]])
            if len(parts) == 3 and parts[0] == "stages" and parts[2] == "output":
                if parts[1] not in self.outputs:
                    raise WeightsmithError(f"{where}: ${{stages.{parts[1]}.output}} names no earlier stage "
                                           f"(earlier: {', '.join(self.outputs) or 'none'})")
                used.append(parts[1])
                return str(self.outputs[parts[1]])
            raise WeightsmithError(f"{where}: unknown reference ${{{m.group(1)}}}; use ${{vars.NAME}}, "
                                   "${stages.NAME.output} or ${workdir}")
        return REF.sub(sub, value)

    def path(self, value: str, where: str, used: list[str], model: bool = False) -> str:
        """A file or folder the stage reads; a ``model`` may also be a Hub name or ``model+adapter``."""
        value = self.text(value, where, used)
        if value.startswith("zoo:"):
            ref = value[4:]
            zoo = self.zoo()
            if ref == "tokenizer":
                return str(zoo.tokenizer)
            if ref.startswith("data/"):
                domain, _, split = ref[5:].partition(".")
                return str(zoo.data(domain, split or "valid"))
            return str(zoo.model(ref))
        p = Path(value).expanduser()
        local = p if p.is_absolute() else self.base / p
        try:
            ref = parse_ref(value) if not local.exists() else None
        except WeightsmithError:
            ref = None  # not a reference: reported as the missing folder it names
        if not model or ref is None or ref.repo_id is None and ref.lora is None:
            return str(local)
        return str(resolve_model(rooted(value, self.base), what=where))  # a Hub name, or model+adapter

    def value(self, value, where: str, used: list[str], as_path: bool, model: bool = False):
        if isinstance(value, str):
            text = self.text(value, where, used)  # a ${vars.X} may itself hold a zoo: reference
            return self.path(text, where, used, model) if as_path or text.startswith("zoo:") else text
        if isinstance(value, list):
            return [self.value(v, where, used, as_path, model) for v in value]
        if isinstance(value, dict):
            return {k: self.value(v, f"{where}.{k}", used, as_path, model) for k, v in value.items()}
        return value


def load_pipeline(path: str | Path, workdir: str | Path | None = None) -> Pipeline:
    """Parse and validate a pipeline file completely: stage names, parameters, inputs and data files."""
    path = Path(path)
    text = read_text_file(path, "pipeline file")
    try:
        doc = load_yaml(text)
    except yaml.YAMLError as exc:
        raise WeightsmithError(f"{path}: not valid YAML ({str(exc).splitlines()[0]})") from None
    if not isinstance(doc, dict) or not isinstance(doc.get("stages"), list) or not doc["stages"]:
        raise WeightsmithError(f"{path}: a pipeline is a mapping with a non-empty 'stages:' list")
    unknown = set(doc) - TOP_KEYS
    if unknown:
        raise WeightsmithError(f"{path}: unknown top-level key(s) {', '.join(sorted(unknown))}; "
                               f"allowed: {', '.join(sorted(TOP_KEYS))}")
    base = path.resolve().parent
    variables = doc.get("vars") or {}
    if not isinstance(variables, dict):
        raise WeightsmithError(f"{path}: 'vars:' must be a mapping")
    wd = Path(workdir) if workdir is not None else Path(doc.get("workdir") or f"{path.stem}-out")
    wd = wd if wd.is_absolute() or workdir is not None else base / wd
    resolver = _Resolver(base, wd.resolve(), str(doc.get("zoo", "tiny")), variables)
    stages: list[StageEntry] = []
    last_model: str | None = None
    for i, raw in enumerate(doc["stages"]):
        entry = _parse_stage(i, raw, resolver, last_model)
        if STAGES[entry.stage].writes_model:
            last_model = entry.name
        resolver.outputs[entry.name] = resolver.workdir / entry.name
        stages.append(entry)
    _check_workdir(resolver.workdir, stages)
    return Pipeline(name=str(doc.get("name") or path.stem), source=path, workdir=resolver.workdir, stages=stages,
                    text=text)


def _check_workdir(workdir: Path, stages: list[StageEntry]) -> None:
    """The workdir (stage outputs, report files) may not be, or lie inside, anything a stage reads."""
    outputs = {workdir / s.name for s in stages}
    for s in stages:
        named = [("inputs", p) for p in s.inputs]
        named += [(f"params.{k}", v) for k in STAGES[s.stage].paths
                  for v in (s.params.get(k) if isinstance(s.params.get(k), list) else [s.params.get(k)])
                  if isinstance(v, str)]
        for key, value in named:
            p = Path(value).resolve()
            if p not in outputs and (p == workdir or p in workdir.parents):
                raise needs_option(f"{s.where(key)}: the workdir {workdir} lies inside {value}, which the stage "
                                   "reads; choose a workdir outside every input", " ({0})", "workdir")


def _parse_stage(i: int, raw, resolver: _Resolver, last_model: str | None) -> StageEntry:
    if not isinstance(raw, dict):
        raise WeightsmithError(f"stage #{i + 1}: each stage is a mapping with 'name' and 'stage'")
    name = raw.get("name")
    where = f"stage {name!r}" if name else f"stage #{i + 1}"
    if not isinstance(name, str) or not NAME.match(name):
        raise WeightsmithError(f"{where}, key 'name': give each stage a name of letters, digits, '-', '_', '.'")
    if name in resolver.outputs:
        raise WeightsmithError(f"{where}, key 'name': two stages are named {name!r}")
    unknown = set(raw) - STAGE_KEYS
    if unknown:
        raise WeightsmithError(f"{where}: unknown key(s) {', '.join(sorted(unknown))}; "
                               f"allowed: {', '.join(sorted(STAGE_KEYS))}")
    kind = raw.get("stage")
    if kind not in STAGES:
        raise WeightsmithError(f"{where}, key 'stage': {kind!r} is not a stage here; available: "
                               f"{', '.join(sorted(STAGES))}")
    spec = STAGES[kind]
    used: list[str] = []
    given = [k for k in ("input", "inputs", "from") if k in raw]
    if len(given) > 1:
        raise WeightsmithError(f"{where}: use one of 'input', 'inputs' or 'from', not {' and '.join(given)}")
    if not given:
        if last_model is None:
            raise WeightsmithError(f"{where}, key 'inputs': the first stage needs its input(s)")
        refs = [f"${{stages.{last_model}.output}}"]
    elif given[0] == "from":
        names = raw["from"] if isinstance(raw["from"], list) else [raw["from"]]
        refs = [f"${{stages.{n}.output}}" for n in names]
    else:
        value = raw[given[0]]
        refs = value if isinstance(value, list) else [value]
    key = given[0] if given else "inputs"
    if not refs or not all(isinstance(r, str) for r in refs):
        raise WeightsmithError(f"{where}, key '{key}': list model folders as strings")
    inputs = [resolver.path(r, f"{where}, key '{key}'", used, model=True) for r in refs]
    if len(inputs) < spec.min_inputs or (spec.max_inputs is not None and len(inputs) > spec.max_inputs):
        want = (f"{spec.min_inputs}" if spec.max_inputs == spec.min_inputs else
                f"{spec.min_inputs} or more" if spec.max_inputs is None else f"{spec.min_inputs} to {spec.max_inputs}")
        raise WeightsmithError(f"{where}, key '{key}': stage {kind!r} takes {want} input(s), got {len(inputs)}")
    pipeline_outputs = set(resolver.outputs.values())
    for p in inputs:
        if Path(p) not in pipeline_outputs and not (Path(p) / "config.json").is_file():
            raise WeightsmithError(f"{where}, key '{key}': {p} is not a model folder (no config.json)")
    params = _check_params(spec, raw.get("params") or {}, where, resolver, used, pipeline_outputs)
    spec.check_options(params, where)
    if spec.check is not None:
        try:
            spec.check(params, inputs)
        except WeightsmithError as exc:
            raise WeightsmithError(f"{where}: {exc}") from None
    return StageEntry(name=name, stage=kind, inputs=inputs, params=params, raw=raw, upstream=list(dict.fromkeys(used)))


def _check_params(spec, params, where: str, resolver: _Resolver, used: list[str], outputs: set[Path]) -> dict:
    if not isinstance(params, dict):
        raise WeightsmithError(f"{where}, key 'params': must be a mapping")
    allowed = spec.parameters()
    hints = spec.hints()
    for key in params:
        if key not in allowed:
            raise WeightsmithError(f"{where}, key 'params.{key}': stage {spec.name!r} has no such parameter; "
                                   f"it takes {', '.join(allowed) or 'none'}")
    for key, p in allowed.items():
        if p.default is p.empty and key not in params:
            raise WeightsmithError(f"{where}, key 'params.{key}': required by stage {spec.name!r}")
    out = {}
    for key, value in params.items():
        value = resolver.value(value, f"{where}, key 'params.{key}'", used, as_path=key in spec.paths,
                               model=key in MODEL_PARAMS)
        if not accepts(hints.get(key, object), value):
            raise WeightsmithError(f"{where}, key 'params.{key}': {value!r} is not a "
                                   f"{getattr(hints.get(key), '__name__', None) or hints.get(key)}")
        if key in spec.paths and value is not None:
            for v in value if isinstance(value, list) else [value]:
                if Path(v) not in outputs and not Path(v).exists():
                    raise WeightsmithError(f"{where}, key 'params.{key}': {v} not found")
        out[key] = value
    return out
