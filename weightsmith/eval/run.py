"""The eval stage: several model folders on the same data, one row each."""
from __future__ import annotations

from pathlib import Path

import torch

from ..device import resolve_device
from ..errors import OutOfRange, WeightsmithError, needs_option
from ..progress import ProgressFn
from ..stage_options import EvalOptions
from ..data import load_labelled, load_labelled_images, load_texts
from .metrics import EvalRow, accuracy, count_params, folder_size, image_accuracy, perplexity, tokenize
from .processors import load_image_processor, load_tokenizer


def model_context(model: torch.nn.Module, requested: int | None) -> int:
    limit = getattr(model.config, "max_position_embeddings", None) or getattr(model.config, "n_positions", None)
    if requested and limit and requested > limit:
        raise OutOfRange("context", requested, 2, limit)
    return requested or limit or 1024


def evaluate_model(path: str | Path, opts: EvalOptions | None = None, *, device: str = "auto",
                   allow_pickle: bool = False, model: torch.nn.Module | None = None,
                   progress: ProgressFn | None = None, **values) -> EvalRow:
    """One row for the model folder at ``path`` (or the already loaded ``model`` read from it); ``values``
    override fields of ``opts`` (an :class:`EvalOptions`)."""
    from ..loading import load

    o = EvalOptions.build(opts, **values)
    dev = resolve_device(device)
    path = Path(path)
    model = model if model is not None else load(path, device=dev, dtype=o.dtype, allow_pickle=allow_pickle)
    images = getattr(model, "main_input_name", "input_ids") == "pixel_values"
    tok = None if images and o.data is None else load_tokenizer(o.tokenizer or path)
    row = EvalRow(model=str(path), params=count_params(model), size_bytes=folder_size(path))
    if not images and not _has_lm_head(model) and (o.data is not None or o.labelled is not None):
        return _encoder_row(row, model, tok, path, o, dev, progress)
    if o.reference is not None:
        raise WeightsmithError(f"{path}: a {type(model).__name__} has a language-model head; the reference scores "
                               "sentence embeddings of encoders (compare causal LMs by perplexity)")
    if o.data is not None:
        ids = tokenize(tok, load_texts(o.data, max_tokens=o.max_tokens), o.max_tokens)
        ctx = model_context(model, o.context)
        res = perplexity(model, ids, context=ctx, stride=o.stride or ctx // 2, batch_size=o.batch_size, device=dev,
                         progress=progress, label=f"perplexity {path.name}")
        row.perplexity, row.nll, row.tokens, row.tokens_per_s = res["perplexity"], res["nll"], res["tokens"], res["tokens_per_s"]
    if o.labelled is not None and images:
        files, labels = load_labelled_images(o.labelled)
        res = image_accuracy(model, load_image_processor(path), files, labels, batch_size=o.batch_size, device=dev,
                             progress=progress)
        row.accuracy = res["accuracy"]
    elif o.labelled is not None:
        texts, labels = load_labelled(o.labelled)
        if tok.pad_token is None:
            tok.pad_token = tok.eos_token
        res = accuracy(model, tok, texts, labels, batch_size=o.batch_size, device=dev, progress=progress)
        row.accuracy = res["accuracy"]
    return row


def _has_lm_head(model: torch.nn.Module) -> bool:
    return model.get_output_embeddings() is not None or type(model).__name__.endswith(
        ("ForSequenceClassification", "ForTokenClassification", "ForImageClassification"))


def _encoder_row(row: EvalRow, model: torch.nn.Module, tok, path: Path, o: EvalOptions, dev,
                 progress: ProgressFn | None) -> EvalRow:
    """An encoder without a task head: no perplexity and no accuracy; with a reference, how far its sentence
    embeddings are from the reference's on the lines of ``data``."""
    from .embeddings import agreement, embed, reference_embeddings, sentences_of
    from ..pooling import read_pooling

    if o.reference is None or o.labelled is not None:
        raise needs_option(f"{path}: a {type(model).__name__} is an encoder without a language-model or "
                           "classification head, so it has no perplexity or accuracy", "; give {0} (the original "
                           "model) to score its sentence embeddings against the original's", "reference")
    sentences = sentences_of(load_texts(o.data, max_tokens=o.max_tokens))
    if not sentences:
        raise WeightsmithError(f"{o.data}: no sentences (one per non-empty line) to embed")
    length = getattr(model.config, "max_position_embeddings", 512) or 512
    got = embed(model, tok, sentences, read_pooling(path), o.batch_size, dev, length, progress, f"embed {path.name}")
    ref = reference_embeddings(str(o.reference), tuple(sentences), o.batch_size, dev,
                               model.dtype if o.dtype else None, length)
    row.extra.update(agreement(got, ref), sentences=len(sentences))
    return row


def evaluate(paths: list[str | Path], opts: EvalOptions | None = None, *, device: str = "auto",
             allow_pickle: bool = False, progress: ProgressFn | None = None, **values) -> list[EvalRow]:
    """One row per model folder, all measured on the same data; ``values`` override fields of ``opts``."""
    o = EvalOptions.build(opts, **values)
    for p in (o.data, o.labelled):
        if p is not None and not Path(p).exists():
            raise WeightsmithError(f"{p}: data file not found")
    for p in paths:
        if not (Path(p) / "config.json").exists():
            raise WeightsmithError(f"{p}: not a model folder (no config.json)")
    from .embeddings import reference_embeddings

    reference_embeddings.cache_clear()  # shared by this call's models only: a later call reads the folder anew
    return [evaluate_model(p, o, device=device, allow_pickle=allow_pickle, progress=progress) for p in paths]
