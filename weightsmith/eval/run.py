"""The eval stage: several model folders on the same data, one row each."""
from __future__ import annotations

from pathlib import Path

import torch

from ..device import resolve_device
from ..errors import WeightsmithError
from ..progress import ProgressFn
from .data import load_labelled, load_labelled_images, load_texts
from .metrics import EvalRow, accuracy, count_params, folder_size, image_accuracy, perplexity, tokenize


def load_tokenizer(path: str | Path, trust_remote_code: bool | None = None):
    from transformers import AutoTokenizer

    from ..checkpoint.trust import check_code

    trusted = check_code(path, trust_remote_code)
    try:
        return AutoTokenizer.from_pretrained(str(path), trust_remote_code=trusted)
    except (OSError, ValueError) as exc:
        raise WeightsmithError(f"{path}: no tokenizer found there ({exc.__class__.__name__}); pass --tokenizer") from None


def load_image_processor(path: str | Path, trust_remote_code: bool | None = None):
    from transformers import AutoImageProcessor

    from ..checkpoint.trust import check_code

    trusted = check_code(path, trust_remote_code)
    try:
        return AutoImageProcessor.from_pretrained(str(path), trust_remote_code=trusted)
    except (OSError, ValueError) as exc:
        raise WeightsmithError(f"{path}: no image processor (preprocessor_config.json) found there "
                               f"({exc.__class__.__name__})") from None


def model_context(model: torch.nn.Module, requested: int | None) -> int:
    limit = getattr(model.config, "max_position_embeddings", None) or getattr(model.config, "n_positions", None)
    if requested and limit and requested > limit:
        raise WeightsmithError(f"--context {requested} exceeds the model's {limit} positions")
    return requested or limit or 1024


def evaluate_model(path: str | Path, *, data: str | Path | None = None, labelled: str | Path | None = None,
                   tokenizer: str | Path | None = None, context: int | None = None, stride: int | None = None,
                   max_tokens: int | None = None, batch_size: int = 8, device: str = "auto",
                   dtype: str | None = None, allow_pickle: bool = False, model: torch.nn.Module | None = None,
                   progress: ProgressFn | None = None) -> EvalRow:
    from ..loading import load

    dev = resolve_device(device)
    path = Path(path)
    model = model if model is not None else load(path, device=dev, dtype=dtype, allow_pickle=allow_pickle)
    images = getattr(model, "main_input_name", "input_ids") == "pixel_values"
    tok = None if images and data is None else load_tokenizer(tokenizer or path)
    row = EvalRow(model=str(path), params=count_params(model), size_bytes=folder_size(path))
    if data is not None:
        ids = tokenize(tok, load_texts(data), max_tokens)
        ctx = model_context(model, context)
        res = perplexity(model, ids, context=ctx, stride=stride or ctx // 2, batch_size=batch_size, device=dev,
                         progress=progress, label=f"perplexity {path.name}")
        row.perplexity, row.nll, row.tokens, row.tokens_per_s = res["perplexity"], res["nll"], res["tokens"], res["tokens_per_s"]
    if labelled is not None and images:
        files, labels = load_labelled_images(labelled)
        res = image_accuracy(model, load_image_processor(path), files, labels, batch_size=batch_size, device=dev,
                             progress=progress)
        row.accuracy = res["accuracy"]
    elif labelled is not None:
        texts, labels = load_labelled(labelled)
        if tok.pad_token is None:
            tok.pad_token = tok.eos_token
        res = accuracy(model, tok, texts, labels, batch_size=batch_size, device=dev, progress=progress)
        row.accuracy = res["accuracy"]
    return row


def evaluate(paths: list[str | Path], **kwargs) -> list[EvalRow]:
    if not kwargs.get("data") and not kwargs.get("labelled"):
        raise WeightsmithError("nothing to measure: pass --data TEXT for perplexity and/or --labelled FILE for accuracy")
    for p in (kwargs.get("data"), kwargs.get("labelled")):
        if p is not None and not Path(p).exists():
            raise WeightsmithError(f"{p}: data file not found")
    for p in paths:
        if not (Path(p) / "config.json").exists():
            raise WeightsmithError(f"{p}: not a model folder (no config.json)")
    return [evaluate_model(p, **kwargs) for p in paths]
