"""``weightsmith.load``: any folder weightsmith writes (plain, folded, hashed) as a transformers model."""
from __future__ import annotations

from pathlib import Path

import torch

from .checkpoint.exact import build_config, check_layer_count, check_tensors, model_class, one_line, refuse_mismatch
from .device import resolve_device, resolve_dtype
from .errors import WeightsmithError


def meta_model(ckpt, path: Path) -> torch.nn.Module:
    """The model of a plain folder on the meta device: names, shapes, module types and tied weights, no memory.
    A folder's own code builds it only where the loading gate (``checkpoint.trust.open_model``) let it through."""
    from .checkpoint.trust import custom_code

    if custom_code(path) is not None:
        from transformers import AutoConfig

        with torch.device("meta"):
            return custom_class(ckpt.config).from_config(AutoConfig.from_pretrained(path, trust_remote_code=True),
                                                         trust_remote_code=True)
    cls = model_class(ckpt.config)
    cfg = build_config(ckpt.config, cls, path)
    check_tensors(cls, cfg, ckpt, path)  # exactly its tensors, before the skeleton is built
    with torch.device("meta"):
        return (getattr(cls, "from_config", None) or cls._from_config)(cfg)


def stored_names(model: torch.nn.Module, ckpt, path: Path, wanted: list[str] | None = None) -> dict[str, str]:
    """Parameter name -> the checkpoint tensor holding it (tied parameters are stored under one of their names)."""
    aliases: dict[int, list[str]] = {}
    params = dict(model.named_parameters(remove_duplicate=False))
    for name, p in params.items():
        aliases.setdefault(id(p), []).append(name)
    names = {}
    for name in wanted if wanted is not None else list(params):
        stored = [n for n in aliases[id(params[name])] if n in ckpt]
        if not stored:
            raise WeightsmithError(f"{path}: tensor {name} is missing")
        names[name] = stored[0]
    return names


def custom_class(config: dict):
    """The transformers auto class through which a folder's own code (``auto_map``) is loaded."""
    import transformers

    auto_map = config.get("auto_map") or {}
    for name in ("AutoModelForCausalLM", "AutoModelForSequenceClassification", "AutoModelForImageClassification",
                 "AutoModelForMaskedLM"):
        if name in auto_map:
            return getattr(transformers, name)
    return transformers.AutoModel


def format_module(fmt: str):
    """The module that loads (``load(path, device, dtype)``), exports (``export_plain``) and describes
    (``describe(checkpoint)``) folders of format ``fmt``: each lives with the stage that writes it."""
    if fmt == "folded":
        from .fold import format as module
    elif fmt == "rps":
        from .compressor import format as module
    else:
        raise WeightsmithError(f"folder format {fmt!r} is unknown to this weightsmith version")
    return module


def load(path: str | Path, device: str | torch.device = "cpu", dtype: str | torch.dtype | None = None,
         allow_pickle: bool = False, trust_remote_code: bool | None = None) -> torch.nn.Module:
    """Load a model in eval mode on ``device`` (plain HF, folded or RPS): a folder, a Hugging Face cache snapshot,
    ``org/name[@revision]`` or ``model+adapter`` (``checkpoint.sources``).

    The folder passes the loading gate first (``checkpoint.trust.open_model``); the model is then built from
    its config.json and the validated tensors. Only a folder with custom code, allowed by ``trust_remote_code``
    (or ``remote_code(True)``), is handed to transformers as a path."""
    from .checkpoint.sources import resolve_model
    from .checkpoint.trust import custom_code, open_model

    path = resolve_model(path, allow_pickle=allow_pickle)  # a folder, a Hub name or model+adapter
    dev = resolve_device(device)
    dt = resolve_dtype(dtype)
    ckpt = open_model(path, allow_pickle=allow_pickle, trust_remote_code=trust_remote_code)
    if ckpt.config is None:
        raise WeightsmithError(f"{path}: no config.json; transformers cannot tell which model the tensors belong to")
    fmt = (ckpt.config.get("weightsmith") or {}).get("format", "plain")
    if fmt != "plain":
        return format_module(fmt).load(path, device=dev, dtype=dt)
    custom = custom_code(path) is not None  # open_model refused it unless allowed
    cls = model_class(ckpt.config)
    kwargs = {"dtype": dt} if dt is not None else {}
    # stages report progress through callbacks; transformers' own loading bar would print
    from transformers.utils import logging as hf_logging

    bars = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()
    try:
        if custom:
            check_layer_count(path, ckpt.config, ckpt.names())
            model, info = custom_class(ckpt.config).from_pretrained(
                path, trust_remote_code=True, use_safetensors=not allow_pickle or None, output_loading_info=True,
                **kwargs)
        else:
            cfg = build_config(ckpt.config, cls, path)
            check_tensors(cls, cfg, ckpt, path)
            state = {n: ckpt.map(n) for n in ckpt.names()}
            model, info = cls.from_pretrained(None, config=cfg, state_dict=state, trust_remote_code=False,
                                              output_loading_info=True, **kwargs)
        # transformers initialises what it did not find at random: the same refusal, from its own account
        refuse_mismatch(path, info["missing_keys"], info["unexpected_keys"])
    except (ValueError, TypeError, KeyError, RuntimeError, OSError) as exc:
        raise WeightsmithError(f"{path}: transformers cannot build the model from its config.json and tensors "
                               f"({one_line(exc)})") from None
    finally:
        if bars:
            hf_logging.enable_progress_bar()
    return model.to(dev).eval()
