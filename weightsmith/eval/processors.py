"""Tokenizers and image processors of model folders, through the loading gate (``checkpoint.trust``): shared by
eval, fold, align, PLeaS and MoE routing."""
from __future__ import annotations

from pathlib import Path

from ..errors import OptionError, WeightsmithError


def load_tokenizer(path: str | Path, trust_remote_code: bool | None = None):
    from ..checkpoint.tokenizer_files import load_tokenizer as open_tokenizer
    from ..checkpoint.trust import check_code

    try:
        return open_tokenizer(path, check_code(path, trust_remote_code))
    except WeightsmithError as exc:
        said = str(exc).replace("{", "{{").replace("}", "}}")  # the message is a template for the option's name
        raise OptionError(None, f"{said}; give a tokenizer folder by {{0}}", ("tokenizer",)) from None


def load_image_processor(path: str | Path, trust_remote_code: bool | None = None):
    from transformers import AutoImageProcessor

    from ..checkpoint.trust import check_code

    trusted = check_code(path, trust_remote_code)
    try:
        return AutoImageProcessor.from_pretrained(str(path), trust_remote_code=trusted)
    except (OSError, ValueError) as exc:
        raise WeightsmithError(f"{path}: no image processor (preprocessor_config.json) found there "
                               f"({exc.__class__.__name__})") from None
