"""The calibration window length a model takes (its positions bound what may be asked for)."""
from __future__ import annotations

from ..errors import OptionError


def model_seq(model, requested: int | None) -> int:
    limit = getattr(model.config, "max_position_embeddings", None) or getattr(model.config, "n_positions", None) or 512
    if requested and requested > limit:
        raise OptionError("seq_len", f"{requested} exceeds the model's {limit} positions")
    return requested or min(limit, 128)
