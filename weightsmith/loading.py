"""``weightsmith.load``: any folder weightsmith writes (plain, folded, hashed) as a transformers model."""
from __future__ import annotations

from pathlib import Path

import torch

from .checkpoint import read_json
from .checkpoint.formats import FORMATS, folder_format, format_module  # noqa: F401  (re-exported)
from .device import resolve_device, resolve_dtype
from .errors import WeightsmithError


def model_class(config: dict):
    import transformers

    for arch in config.get("architectures") or []:
        cls = getattr(transformers, arch, None)
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


def check_shapes(cls, cfg, ckpt) -> None:
    """Refuse tensors whose shapes the config contradicts, naming the first one (checked on a skeleton
    model on the meta device: no memory, no weights initialised)."""
    build = getattr(cls, "from_config", None) or cls._from_config
    try:
        with torch.device("meta"):
            skeleton = build(cfg)
    except Exception:  # noqa: BLE001 - from_pretrained reports what is wrong with the config
        return
    for name, t in skeleton.state_dict().items():
        if name in ckpt and tuple(ckpt.info(name).shape) != tuple(t.shape):
            raise WeightsmithError(
                f"{ckpt.path}: tensor {name!r} has shape {list(ckpt.info(name).shape)} but config.json makes it "
                f"{list(t.shape)}; the config does not belong to these weights")


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
    check_shapes(cls, cfg, ckpt)
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
            model = custom_class(ckpt.config).from_pretrained(
                path, trust_remote_code=True, use_safetensors=not allow_pickle or None, **kwargs)
        else:
            cfg = build_config(ckpt.config, cls, path)
            check_shapes(cls, cfg, ckpt)
            state = {n: ckpt.map(n) for n in ckpt.names()}
            model = cls.from_pretrained(None, config=cfg, state_dict=state, trust_remote_code=False, **kwargs)
    except (ValueError, TypeError, KeyError, RuntimeError, OSError) as exc:
        raise WeightsmithError(f"{path}: transformers cannot build the model from its config.json and tensors "
                               f"({one_line(exc)})") from None
    finally:
        if bars:
            hf_logging.enable_progress_bar()
    return model.to(dev).eval()
