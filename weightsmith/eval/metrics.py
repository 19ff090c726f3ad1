"""Perplexity (sliding window with stride), classification accuracy, size and speed of model folders."""
from __future__ import annotations

import math
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F

from ..device import resolve_device
from ..errors import WeightsmithError
from ..progress import ProgressFn, track


def tokenize(tokenizer, texts: list[str], max_tokens: int | None = None) -> torch.Tensor:
    """One token stream: texts joined by the EOS token, cut to ``max_tokens``."""
    from ..data import token_stream

    ids = token_stream(tokenizer, texts, max_tokens or sys.maxsize, tokenizer.eos_token_id)
    if len(ids) < 2:
        raise WeightsmithError("evaluation data has fewer than 2 tokens")
    return torch.tensor(ids[:max_tokens] if max_tokens else ids, dtype=torch.long)


def windows(n: int, context: int, stride: int) -> list[tuple[int, int, int]]:
    """(begin, end, scored) windows: each scores its last ``scored`` tokens, every token but the first once.

    A window of ``context`` tokens predicts at most ``context - 1`` of them, so the stride is capped there.
    """
    if stride > context or stride < 1 or context < 2:
        raise WeightsmithError(f"stride {stride} must be between 1 and the context length {context} (>= 2)")
    step = min(stride, context - 1)
    out = []
    for t0 in range(1, n, step):
        end = min(t0 + step, n)
        out.append((max(0, end - context), end, end - t0))
    return out


@torch.no_grad()
def perplexity(model: torch.nn.Module, ids: torch.Tensor, *, context: int, stride: int | None = None,
               batch_size: int = 8, device: str | torch.device = "cpu",
               progress: ProgressFn | None = None, label: str = "perplexity") -> dict:
    """exp(mean NLL) over every token of ``ids`` but the first, each predicted from up to ``context`` tokens."""
    dev = resolve_device(device)
    stride = stride or context
    wins = windows(ids.numel(), context, stride)
    groups: dict[int, list[tuple[int, int, int]]] = {}
    for w in wins:
        groups.setdefault(w[1] - w[0], []).append(w)
    batches = [g[i:i + batch_size] for g in groups.values() for i in range(0, len(g), batch_size)]
    nll, count = 0.0, 0
    start = time.perf_counter()
    for batch in track(progress, label, batches):
        x = torch.stack([ids[b:e] for b, e, _ in batch]).to(dev)
        logits = model(input_ids=x).logits
        for row, (b, e, scored) in enumerate(batch):
            # only the scored positions in float32, one window at a time: a float32 copy of the batch's logits
            # would be the largest tensor of the pass for a 32K-100K vocabulary
            pred = logits[row, e - b - scored - 1: e - b - 1].float()
            nll += F.cross_entropy(pred, x[row, e - b - scored:], reduction="sum").item()
            count += scored
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)
    seconds = time.perf_counter() - start
    processed = sum(e - b for b, e, _ in wins)
    return {"perplexity": math.exp(nll / count), "nll": nll / count, "tokens": count,
            "seconds": seconds, "tokens_per_s": processed / seconds if seconds > 0 else float("inf")}


def class_ids(model: torch.nn.Module, labels: list) -> torch.Tensor:
    """Labels as class ids: ids as given, or names looked up in config.label2id."""
    label2id = getattr(model.config, "label2id", None) or {}
    targets = []
    for lab in labels:
        if isinstance(lab, int) or (isinstance(lab, str) and lab.lstrip("-").isdigit()):
            targets.append(int(lab))
        elif lab in label2id:
            targets.append(int(label2id[lab]))
        else:
            raise WeightsmithError(f"label {lab!r} is neither a class id nor one of {sorted(label2id)}")
    return torch.tensor(targets)


@torch.no_grad()
def _accuracy(model: torch.nn.Module, encode, items: list, labels: list, batch_size: int, device,
              progress: ProgressFn | None) -> dict:
    """Share of ``items`` whose argmax class equals the label; ``encode`` turns a batch into model inputs."""
    dev = resolve_device(device)
    targets = class_ids(model, labels)
    correct = 0
    start = time.perf_counter()
    for i in track(progress, "accuracy", list(range(0, len(items), batch_size))):
        pred = model(**encode(items[i:i + batch_size]).to(dev)).logits.argmax(-1).cpu()
        correct += int((pred == targets[i:i + batch_size]).sum())
    return {"accuracy": correct / len(items), "examples": len(items), "seconds": time.perf_counter() - start}


def accuracy(model: torch.nn.Module, tokenizer, texts: list[str], labels: list, *, batch_size: int = 32,
             max_length: int = 256, device: str | torch.device = "cpu", progress: ProgressFn | None = None) -> dict:
    """Accuracy of a sequence classifier on ``texts``."""
    return _accuracy(model, lambda batch: tokenizer(batch, padding=True, truncation=True, max_length=max_length,
                                                    return_tensors="pt"), texts, labels, batch_size, device, progress)


def image_accuracy(model: torch.nn.Module, processor, images: list[Path], labels: list, *, batch_size: int = 32,
                   device: str | torch.device = "cpu", progress: ProgressFn | None = None) -> dict:
    """Accuracy of an image classifier on image files, prepared by the model's own image processor."""
    from PIL import Image

    mode = "L" if getattr(model.config, "num_channels", 3) == 1 else "RGB"

    def encode(batch):
        pictures = []
        for f in batch:
            with Image.open(f) as im:
                pictures.append(im.convert(mode))
        return processor(images=pictures, return_tensors="pt")

    return _accuracy(model, encode, images, labels, batch_size, device, progress)


def count_params(model: torch.nn.Module) -> int:
    """Parameters as stored: a tensor shared by several modules counts once."""
    seen = set()
    total = 0
    for p in model.parameters():
        if p.data_ptr() in seen:
            continue
        seen.add(p.data_ptr())
        total += p.numel()
    return total


def folder_size(path: Path) -> int:
    return sum(p.stat().st_size for p in Path(path).rglob("*") if p.is_file() and p.suffix in (".safetensors", ".bin"))


@dataclass
class EvalRow:
    model: str
    params: int
    size_bytes: int
    perplexity: float | None = None
    nll: float | None = None
    tokens: int | None = None
    tokens_per_s: float | None = None
    accuracy: float | None = None
    extra: dict = field(default_factory=dict)

    def to_dict(self) -> dict:
        d = asdict(self)
        d.update(d.pop("extra"))
        return d
