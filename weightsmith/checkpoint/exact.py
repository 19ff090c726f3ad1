"""A model is exactly its tensors: the transformers model a config.json describes, checked against a folder's
tensors on a meta-device skeleton (layer count first, then every parameter and buffer, names and shapes) before
anything is allocated. Used by ``weightsmith.load`` and by the writer's publish check."""
from __future__ import annotations

import re
from pathlib import Path

import torch

from ..errors import WeightsmithError
from .layout import num_layers


def model_class(config: dict):
    import transformers

    for arch in config.get("architectures") or []:
        cls = getattr(transformers, arch, None)
        if cls is not None and not (isinstance(cls, type) and issubclass(cls, transformers.PreTrainedModel)):
            raise WeightsmithError(f"config.json: architectures names {arch!r}, which in transformers is not a model "
                                   "class; name the model's class (e.g. LlamaForCausalLM)")
        if cls is not None:
            return cls
    return transformers.AutoModel


def config_object(config: dict, cls=None):
    """The transformers config object for a config.json dict (built here: nothing else is read)."""
    from transformers import AutoConfig

    plain = {k: v for k, v in config.items() if k != "weightsmith"}
    config_class = getattr(cls, "config_class", None)
    if config_class is not None:
        return config_class.from_dict(plain)
    if "model_type" not in plain:
        raise WeightsmithError("config.json has no model_type; transformers cannot tell which model it is")
    return AutoConfig.for_model(plain.pop("model_type"), **plain)


def one_line(exc: BaseException, limit: int = 240) -> str:
    text = " ".join(str(exc).split()) or exc.__class__.__name__
    return text if len(text) <= limit else text[: limit - 3] + "..."


def build_config(config: dict, cls, path: Path):
    try:
        return config_object(config, cls)
    except WeightsmithError as exc:
        raise WeightsmithError(f"{path}: {exc}") from None
    except Exception as exc:  # transformers validates config fields with its own exception types
        raise WeightsmithError(f"{path}/config.json: transformers refuses it ({one_line(exc)})") from None


_BLOCK = re.compile(r"^(.*?)\.(\d+)\.")


def stored_layers(names) -> tuple[str, set[int]]:
    """The numbered block list the tensors hold (the prefix with most indices, e.g. ``model.layers``) and its indices."""
    found: dict[str, set[int]] = {}
    for name in names:
        m = _BLOCK.match(name)
        if m:
            found.setdefault(m.group(1), set()).add(int(m.group(2)))
    if not found:
        return "", set()
    prefix = max(found, key=lambda p: len(found[p]))
    return prefix, found[prefix]


def check_layer_count(path: Path, config: dict, names, skip: set[int] = frozenset()) -> None:
    """Refuse a config.json that makes the model deeper than its tensors before any model is built (a
    million-layer config over four layers of tensors would otherwise be built, block by block, first).
    ``skip``: blocks stored elsewhere by design (a folded group's members share its first block's tensors)."""
    n = num_layers(config)
    if n is None:
        return
    prefix, have = stored_layers(names)
    lack = next((i for i in range(n) if i not in have and i not in skip), None)  # stops at the first gap
    if lack is not None:
        raise WeightsmithError(
            f"{path}: config.json makes the model {n} layers deep but the tensors hold {len(have)} "
            f"({prefix or 'no numbered blocks'}; none for layer {lack}); the config does not belong to these weights")


def refuse_mismatch(path: Path, missing, unexpected) -> None:
    """One line for a folder that is not exactly the model its config describes."""
    for names, what in ((missing, "the model config.json describes needs tensor {} but the folder lacks it"),
                        (unexpected, "tensor {} is not part of the model config.json describes")):
        names = sorted(names)
        if names:
            more = f" (and {len(names) - 1} more)" if len(names) > 1 else ""
            raise WeightsmithError(f"{path}: {what.format(repr(names[0]))}{more}; the folder does not hold "
                                   "exactly this model's weights")


def _skeleton(cls, cfg):
    build = getattr(cls, "from_config", None) or cls._from_config
    with torch.device("meta"):
        return build(cfg)


def _checkpoint_keys(skeleton, names) -> dict[str, str]:
    """Checkpoint tensor name -> the model key transformers loads it into (its renamings and base-model prefix)."""
    expected = skeleton.state_dict()
    try:
        from transformers.conversion_mapping import get_model_conversion_mapping
        from transformers.core_model_loading import WeightConverter, WeightRenaming, rename_source_key

        mapping = get_model_conversion_mapping(skeleton)
        renamings = [m for m in mapping if isinstance(m, WeightRenaming)]
        converters = [m for m in mapping if isinstance(m, WeightConverter)]
    except (ImportError, AttributeError):  # another transformers version: names taken as they are
        return {n: n for n in names}
    keys = {}
    for name in names:
        key = rename_source_key(name, renamings, converters, skeleton.base_model_prefix, expected)[0]
        if key not in expected and name in expected:
            key = name
        keys[name] = key
    return keys


def check_tensors(cls, cfg, ckpt, path: Path) -> None:
    """The folder must be exactly the model: every parameter and persistent buffer the config's model has
    (tied copies aside) stored, no other tensor, every shape the config's. Checked on a skeleton model on the
    meta device (no memory, no weights initialised), after the layer count, before anything is allocated."""
    check_layer_count(path, ckpt.config, ckpt.names())
    try:
        skeleton = _skeleton(cls, cfg)
    except Exception:  # noqa: BLE001 - from_pretrained reports what is wrong with the config
        return
    expected = skeleton.state_dict()
    keys = _checkpoint_keys(skeleton, ckpt.names())
    stored_as = {key: name for name, key in keys.items()}
    for key, name in ((k, stored_as[k]) for k in expected if k in stored_as):  # in the model's order
        if tuple(ckpt.info(name).shape) != tuple(expected[key].shape):
            raise WeightsmithError(
                f"{path}: tensor {name!r} has shape {list(ckpt.info(name).shape)} but config.json makes it "
                f"{list(expected[key].shape)}; the config does not belong to these weights")
    stored = set(stored_as)
    tied = getattr(skeleton, "all_tied_weights_keys", None) or {}
    missing = {k for k in expected if k not in stored and not (k in tied and tied[k] in stored)}
    unexpected = {n for n, k in keys.items() if k not in expected}
    missing, unexpected = ignored_by_transformers(skeleton, missing, unexpected)
    refuse_mismatch(path, missing, unexpected)


def ignored_by_transformers(skeleton, missing: set, unexpected: set) -> tuple[set, set]:
    """Drop the keys the model class declares optional (e.g. an old checkpoint's ``rotary_emb.inv_freq``)."""
    try:
        from transformers.utils.loading_report import LoadStateDictInfo

        info = LoadStateDictInfo(missing_keys=set(missing), unexpected_keys=set(unexpected), mismatched_keys=set(),
                                 error_msgs=[], conversion_errors={}, skipped_pp_keys=set())
        skeleton._adjust_missing_and_unexpected_keys(info)
    except (ImportError, AttributeError, TypeError):
        return missing, unexpected
    return info.missing_keys, info.unexpected_keys
