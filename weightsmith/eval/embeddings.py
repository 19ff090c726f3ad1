"""How far an encoder's sentence embeddings moved from a reference model's (a folded, compressed or merged
encoder against its original): the cosine of each sentence's embedding to the reference's (mean and worst), and
the Spearman correlation of all pairwise sentence similarities with the reference's (STS-style agreement).
Embeddings are pooled as the folder's sentence-transformers files say (``fold.pooling``), then normalised."""
from __future__ import annotations

import functools

import torch

from ..pooling import read_pooling
from ..progress import ProgressFn, report

MAX_SENTENCES = 2000  # pairwise similarities grow with the square


def sentences_of(texts: list[str]) -> list[str]:
    """One sentence per non-empty line of the data, at most ``MAX_SENTENCES``."""
    lines = [line.strip() for text in texts for line in text.splitlines() if line.strip()]
    return lines[:MAX_SENTENCES]


@torch.no_grad()
def embed(model: torch.nn.Module, tok, sentences: list[str], pooling, batch_size: int, device: torch.device,
          max_length: int, progress: ProgressFn | None = None, label: str = "embed") -> torch.Tensor:
    out = []
    for start in range(0, len(sentences), batch_size):
        enc = tok(sentences[start:start + batch_size], padding=True, truncation=True, max_length=max_length,
                  return_tensors="pt").to(device)
        hidden = model(**enc).last_hidden_state
        out.append(pooling(hidden.float(), enc["attention_mask"]).cpu())
        report(progress, label, min(start + batch_size, len(sentences)), len(sentences))
    return torch.nn.functional.normalize(torch.cat(out), dim=-1)


def spearman(a: torch.Tensor, b: torch.Tensor) -> float:
    """Spearman's rank correlation of two 1-D tensors (ties broken by position)."""
    ra, rb = a.argsort().argsort().double(), b.argsort().argsort().double()
    ra, rb = ra - ra.mean(), rb - rb.mean()
    return float((ra * rb).sum() / (ra.norm() * rb.norm()))


def agreement(got: torch.Tensor, ref: torch.Tensor) -> dict:
    """Mean and minimum cosine of matching rows, and the Spearman correlation of the pairwise similarities."""
    cos = (got * ref).sum(-1)
    iu = torch.triu_indices(len(ref), len(ref), 1)
    rho = spearman((got @ got.T)[iu[0], iu[1]], (ref @ ref.T)[iu[0], iu[1]]) if len(ref) > 2 else float("nan")
    return {"cosine": float(cos.mean()), "cosine_min": float(cos.min()), "spearman": rho}


@functools.lru_cache(maxsize=2)  # every model of one eval call is scored against the same reference: embed it once
def reference_embeddings(path, sentences: tuple[str, ...], batch_size: int, device: torch.device, dtype,
                         max_length: int) -> torch.Tensor:
    """The reference model's sentence embeddings, with its own tokenizer and pooling."""
    from ..loading import load
    from .processors import load_tokenizer

    reference = load(path, device=device, dtype=dtype)
    try:
        return embed(reference, load_tokenizer(path), list(sentences), read_pooling(path), batch_size, device,
                     max_length)
    finally:
        del reference
