"""A base model with a peft LoRA adapter applied (the ``model+adapter`` reference), written once as a plain folder.

Per targeted module, W' = W + s·B·A (transposed for embeddings and ``fan_in_fan_out`` layers), s = alpha / r
(alpha / sqrt(r) with rsLoRA; ``rank_pattern`` / ``alpha_pattern`` per module), computed as peft's
``merge_and_unload`` computes it: the delta in float32, cast to the weight's dtype, then added. Tensors the
adapter stores whole (``modules_to_save``, trained biases, saved embedding layers) replace the base's. The
result streams tensor by tensor into a folder under the weightsmith cache keyed by both inputs' files, so
a second use costs nothing.
"""
from __future__ import annotations

import hashlib
import json
import math
import os
import re
import shutil
import tempfile
from pathlib import Path

import torch

from ..errors import WeightsmithError
from .patterns import check_pattern
from .files import member, read_json
from .reader import Checkpoint

PREFIX = "base_model.model."
ADAPTER_CONFIG = "adapter_config.json"
# Side files of a sentence-transformers model, carried beside config.json so the merged folder loads as the base.
EXTRA_SIDE = ("modules.json", "sentence_bert_config.json", "config_sentence_transformers.json")


def cache_root() -> Path:
    from platformdirs import user_cache_dir

    if os.environ.get("WEIGHTSMITH_ADAPTERS_CACHE"):
        return Path(os.environ["WEIGHTSMITH_ADAPTERS_CACHE"])
    return Path(os.environ.get("WEIGHTSMITH_CACHE") or user_cache_dir("weightsmith")) / "adapters-applied"


def _fingerprint(folder: Path) -> list:
    real = folder.resolve()
    return [str(real)] + sorted((p.relative_to(real).as_posix(), st.st_size, st.st_mtime_ns)
                                for p in real.rglob("*") if (st := p.stat()) and p.is_file())


# adapter_config.json fields weightsmith reads, with the types peft writes (None always allowed).
FIELD_TYPES = {"peft_type": str, "base_model_name_or_path": str, "r": int, "lora_alpha": (int, float),
               "target_modules": (str, list), "modules_to_save": list, "alpha_pattern": dict, "rank_pattern": dict,
               "use_rslora": bool, "use_dora": bool, "fan_in_fan_out": bool}


def read_adapter_config(adapter: Path) -> dict:
    """``adapter_config.json`` read through the gate, its fields' types and pattern keys checked: a malformed
    one is one line naming the field."""
    path = member(adapter, ADAPTER_CONFIG, adapter)
    config = read_json(path, ADAPTER_CONFIG)
    for key, kinds in FIELD_TYPES.items():
        value = config.get(key)
        wrong = value is not None and (not isinstance(value, kinds) or (isinstance(value, bool) and kinds is not bool))
        if wrong or (isinstance(value, (int, float)) and not isinstance(value, bool) and not 0 < value < math.inf):
            raise WeightsmithError(f"{path}: '{key}' is {value!r}; peft writes {_kind_name(kinds)} there")
    for key in ("alpha_pattern", "rank_pattern"):
        for pattern, value in (config.get(key) or {}).items():
            check_pattern(pattern, f"{path}: '{key}'")
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 < value < math.inf:
                raise WeightsmithError(f"{path}: '{key}' gives {pattern!r} the value {value!r}; it must be a "
                                       "positive number")
    return config


def _kind_name(kinds) -> str:
    names = {str: "a string", int: "a positive integer", float: "a positive number", bool: "true or false",
             list: "a list", dict: "a mapping"}
    return " or ".join(names[k] for k in (kinds if isinstance(kinds, tuple) else (kinds,)))


def adapter_config(adapter: Path, where: str) -> dict:
    if not (adapter / ADAPTER_CONFIG).exists():
        raise WeightsmithError(f"{where}: {adapter} is not a peft adapter folder (no {ADAPTER_CONFIG})")
    config = read_adapter_config(adapter)
    kind = config.get("peft_type") or "LORA"
    if kind != "LORA":
        raise WeightsmithError(f"{where}: {adapter} is a {kind!r} adapter; only LoRA adapters can be applied")
    if config.get("use_dora"):
        raise WeightsmithError(f"{where}: {adapter} is a DoRA adapter (use_dora); only plain LoRA can be applied")
    return config


def apply_adapter(base: str | Path, adapter: str | Path, where: str = "model") -> Path:
    """The folder holding ``base`` with the LoRA ``adapter`` applied (built on first use, then reused)."""
    from .trust import open_model

    base, adapter = Path(base), Path(adapter)
    base_ckpt = open_model(base)
    config = adapter_config(adapter, where)
    lora = Checkpoint(adapter)
    key = hashlib.sha256(json.dumps([_fingerprint(base), _fingerprint(adapter)]).encode()).hexdigest()[:20]
    target = cache_root() / key
    if (target / "config.json").is_file():
        return target
    plan = _plan(base_ckpt, lora, config, where)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{key}.tmp-", dir=target.parent))
    try:
        _write(base_ckpt, lora, plan, tmp)
        try:
            os.rename(tmp, target)
        except OSError:  # another process finished the same folder first
            if not (target / "config.json").is_file():
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return target


def _pattern_value(patterns: dict, module: str, default):
    """peft's per-module override: a key matches a module whose name ends with it at a dot boundary."""
    for key, value in patterns.items():
        if re.match(rf"(.*\.)?({key})$", module):
            return value
    return default


def _scale(config: dict, module: str, r: int) -> float:
    """peft's scaling of one module's B·A: alpha / r, or alpha / sqrt(r) with rsLoRA (``alpha_pattern`` per module)."""
    alpha = _pattern_value(config.get("alpha_pattern") or {}, module, config.get("lora_alpha", 8))
    return alpha / math.sqrt(r) if config.get("use_rslora") else alpha / r


def _plan(base: Checkpoint, lora: Checkpoint, config: dict, where: str) -> dict[str, list]:
    """For each base tensor the adapter changes: [replacement name or None, (A name, B name, scale, kind) or None,
    lora bias name or None]."""
    plan: dict[str, list] = {}
    for name in lora.names():
        if not name.startswith(PREFIX):
            raise WeightsmithError(f"{where}: adapter tensor {name!r} does not start with {PREFIX!r}; not a peft "
                                   "LoRA adapter saved by save_pretrained")
        rest = name[len(PREFIX):]
        if ".lora_magnitude_vector" in rest:
            raise WeightsmithError(f"{where}: adapter tensor {name!r} belongs to DoRA; only plain LoRA can be applied")
        m = re.fullmatch(r"(.+)\.(lora_A\.weight|lora_embedding_A)", rest)
        if m:
            module, kind = m.group(1), ("embedding" if "embedding" in m.group(2) else "linear")
            other = f"{PREFIX}{module}.{'lora_B.weight' if kind == 'linear' else 'lora_embedding_B'}"
            if other not in lora:
                raise WeightsmithError(f"{where}: adapter has {name!r} but not {other!r}")
            scale = _scale(config, module, lora.info(name).shape[0])
            if kind == "linear" and config.get("fan_in_fan_out"):
                kind = "transposed"
            _entry(plan, base, f"{module}.weight", where)[1] = (name, other, scale, kind)
        elif re.search(r"\.(lora_B\.weight|lora_embedding_B)$", rest):
            continue
        elif rest.endswith(".lora_B.bias"):
            module = rest[: -len(".lora_B.bias")]
            scale = _scale(config, module, lora.info(f"{PREFIX}{module}.lora_B.weight").shape[1])
            _entry(plan, base, f"{module}.bias", where)[2] = (name, scale)
        elif re.search(r"\.lora_[A-Za-z_]+", rest):
            raise WeightsmithError(f"{where}: adapter tensor {name!r} is of a LoRA variant that cannot be applied")
        else:
            _entry(plan, base, rest.replace(".base_layer.", "."), where)[0] = name
    if not plan:
        raise WeightsmithError(f"{where}: the adapter holds no LoRA weights")
    return plan


def _entry(plan: dict, base: Checkpoint, target: str, where: str) -> list:
    if target not in base:
        raise WeightsmithError(f"{where}: the adapter changes {target!r}, which the base model does not have; the "
                               "adapter was trained on another model")
    return plan.setdefault(target, [None, None, None])


def _delta(lora: Checkpoint, spec: tuple, shape: tuple, where: str) -> torch.Tensor:
    a_name, b_name, scale, kind = spec
    a, b = lora.get(a_name), lora.get(b_name)
    stored = a.dtype
    a, b = a.float(), b.float()
    delta = (b @ a).T * scale if kind in ("embedding", "transposed") else (b @ a) * scale
    if tuple(delta.shape) != tuple(shape):
        raise WeightsmithError(f"{where}: adapter {a_name!r} makes a {list(delta.shape)} change to a {list(shape)} "
                               "weight; the adapter was trained on another model")
    return delta.to(stored)  # in the adapter's dtype, which the addition then promotes to, as in peft


def _write(base: Checkpoint, lora: Checkpoint, plan: dict, folder: Path) -> None:
    from .writer import DEFAULT_SHARD_SIZE, ShardedWriter, copy_side_files, write_config

    entries = [(n, base.info(n).torch_dtype, tuple(base.info(n).shape)) for n in base.names()]
    writer = ShardedWriter(folder, entries, DEFAULT_SHARD_SIZE, metadata=base.metadata or None)
    for name, dtype, shape in entries:
        t = base.read(name)
        if name in plan:
            replace_name, lora_spec, bias = plan[name]
            if replace_name is not None:
                t = lora.read(replace_name).to(dtype)
                if tuple(t.shape) != shape:
                    raise WeightsmithError(f"{name}: the adapter's copy has shape {list(t.shape)}, the base's {list(shape)}")
            if lora_spec is not None:
                t = (t + _delta(lora, lora_spec, shape, name)).to(dtype)
            if bias is not None:
                t = t + (lora.get(bias[0]).float() * bias[1]).to(dtype)
        writer.write(name, t)
    writer.close()
    if base.config is not None:
        write_config(folder, base.config)
    copy_side_files(base.path, folder)
    extra = [*EXTRA_SIDE, *(p.relative_to(base.path).as_posix() for p in sorted(base.path.glob("*/config.json")))]
    for rel in extra:  # sentence-transformers files and modules (1_Pooling/, ...), read through the gate
        src = member(base.path, rel, base.path)
        if src.is_file():
            (folder / rel).parent.mkdir(exist_ok=True)
            shutil.copyfile(src, folder / rel)


def write_adapter(folder: str | Path, tensors: dict[str, torch.Tensor], config: dict) -> int:
    """Write a LoRA adapter as peft lays it out (``adapter_model.safetensors`` beside ``adapter_config.json``)
    into ``folder`` (an ``output_folder``); returns the weights' bytes."""
    from safetensors.torch import save_file

    folder = Path(folder)
    weights = folder / "adapter_model.safetensors"
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(weights), metadata={"format": "pt"})
    (folder / ADAPTER_CONFIG).write_text(json.dumps(config, indent=2) + "\n")
    return weights.stat().st_size
