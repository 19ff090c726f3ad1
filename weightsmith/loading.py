"""``weightsmith.load``: any folder weightsmith writes (plain, folded, hashed) as a transformers model."""
from __future__ import annotations

from pathlib import Path

import torch

from .checkpoint import read_json
from .checkpoint.exact import (build_config, check_layer_count, check_tensors, config_object,  # noqa: F401
                               model_class, one_line, refuse_mismatch)
from .checkpoint.formats import FORMATS, folder_format, format_module  # noqa: F401  (re-exported)
from .device import resolve_device, resolve_dtype
from .errors import WeightsmithError


def custom_class(config: dict):
    """The transformers auto class through which a folder's own code (``auto_map``) is loaded."""
    import transformers

    auto_map = config.get("auto_map") or {}
    for name in ("AutoModelForCausalLM", "AutoModelForSequenceClassification", "AutoModelForImageClassification",
                 "AutoModelForMaskedLM"):
        if name in auto_map:
            return getattr(transformers, name)
    return transformers.AutoModel


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
