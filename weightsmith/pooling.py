"""Sentence embeddings the way sentence-transformers computes them from an encoder folder.

``modules.json`` lists the pipeline (Transformer, Pooling, optional Dense / Normalize); the Pooling
module's ``config.json`` (e.g. ``1_Pooling/config.json``) names the modes: CLS token, mean, max,
mean / sqrt(length), position-weighted mean, last token; several modes are concatenated in that order
(as sentence-transformers does). A folder without ``modules.json`` is pooled by the mean of its tokens.
The fold measures and heals encoders on this pooled embedding; its output keeps these files
(``checkpoint.formats``), and so does every folder made from it.
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F

from .checkpoint.formats import st_root
from .errors import WeightsmithError

# Pooling config keys, in sentence-transformers' concatenation order
MODES = {"pooling_mode_cls_token": "cls", "pooling_mode_max_tokens": "max", "pooling_mode_mean_tokens": "mean",
         "pooling_mode_mean_sqrt_len_tokens": "mean_sqrt_len", "pooling_mode_weightedmean_tokens": "weightedmean",
         "pooling_mode_lasttoken": "lasttoken"}
OTHER_KEYS = {"word_embedding_dimension", "include_prompt"}
KNOWN_MODULES = {"Transformer", "Pooling", "Normalize", "Dense"}


@dataclass
class Pooling:
    modes: list[str] = field(default_factory=lambda: ["mean"])
    normalize: bool = False
    source: str = "default (no modules.json): mean of the tokens"

    def __call__(self, hidden: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        """[batch, dim * len(modes)] sentence embedding of [batch, seq, dim] token states."""
        if mask is None:
            mask = torch.ones(hidden.shape[:2], dtype=hidden.dtype, device=hidden.device)
        m = mask.to(hidden.dtype).unsqueeze(-1)
        count = m.sum(1).clamp_min(1e-9)
        parts = []
        for mode in self.modes:
            if mode == "cls":
                parts.append(hidden[:, 0])
            elif mode == "max":
                parts.append(hidden.masked_fill(m == 0, torch.finfo(hidden.dtype).min).amax(1))
            elif mode == "mean":
                parts.append((hidden * m).sum(1) / count)
            elif mode == "mean_sqrt_len":
                parts.append((hidden * m).sum(1) / count.sqrt())
            elif mode == "weightedmean":
                w = m * torch.arange(1, hidden.shape[1] + 1, device=hidden.device, dtype=hidden.dtype)[None, :, None]
                parts.append((hidden * w).sum(1) / w.sum(1).clamp_min(1e-9))
            elif mode == "lasttoken":
                last = mask.long().sum(1).sub(1).clamp_min(0)
                parts.append(hidden[torch.arange(hidden.shape[0], device=hidden.device), last])
        out = torch.cat(parts, dim=-1)
        return F.normalize(out, dim=-1) if self.normalize else out


def _read(path: Path) -> object:
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise WeightsmithError(f"{path}: not valid JSON ({e.msg} at line {e.lineno})") from None


def _module_type(entry: dict, path: Path) -> str:
    name = str(entry.get("type", "")).rsplit(".", 1)[-1]
    if name not in KNOWN_MODULES:
        raise WeightsmithError(f"{path}: module type {entry.get('type')!r} is not one of "
                               f"{', '.join(sorted(KNOWN_MODULES))} (sentence-transformers models)")
    return name


def read_pooling(folder: str | Path) -> Pooling:
    """The pooling of the sentence-transformers pipeline stored in ``folder`` (mean pooling if there is none)."""
    folder = st_root(folder)
    modules_path = folder / "modules.json"
    if not modules_path.is_file():
        return Pooling()
    modules = _read(modules_path)
    if not isinstance(modules, list) or not all(isinstance(m, dict) for m in modules):
        raise WeightsmithError(f"{modules_path}: expected a list of modules ({{'path': ..., 'type': ...}})")
    pooling, normalize = None, False
    for entry in modules:
        kind = _module_type(entry, modules_path)
        if kind == "Normalize":
            normalize = True
        elif kind == "Pooling":
            cfg_path = folder / str(entry.get("path", "")) / "config.json"
            if not cfg_path.is_file():
                raise WeightsmithError(f"{cfg_path}: pooling config named in modules.json is missing")
            cfg = _read(cfg_path)
            if not isinstance(cfg, dict):
                raise WeightsmithError(f"{cfg_path}: expected a JSON object of pooling_mode_* flags")
            unknown = sorted(set(cfg) - set(MODES) - OTHER_KEYS)
            if unknown:
                raise WeightsmithError(f"{cfg_path}: unknown pooling key {unknown[0]!r}; known: {', '.join(MODES)}")
            modes = [mode for key, mode in MODES.items() if cfg.get(key)]
            if not modes:
                raise WeightsmithError(f"{cfg_path}: no pooling_mode_* is true")
            pooling = (modes, str(cfg_path.relative_to(folder)))
    if pooling is None:
        raise WeightsmithError(f"{modules_path}: lists no Pooling module")
    return Pooling(modes=pooling[0], normalize=normalize, source=f"{pooling[1]}{' + Normalize' if normalize else ''}")
