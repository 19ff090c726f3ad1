"""A family of tiny models on disk for the mergekit comparisons: a random Llama base and fine-tunes of it."""
from __future__ import annotations

from pathlib import Path

import torch


def perturbed_family(root: Path, count: int = 3, zero_fraction: float | None = None) -> Path:
    """``root/base`` (random Llama, float32) and ``root/ft0..`` with Gaussian deltas growing with the index;
    with ``zero_fraction``, about that share of each delta is exactly zero (ties at trim cuts)."""
    from weightsmith.checkpoint import Checkpoint, save_state_dict
    from weightsmith.zoo.synthetic import random_llama

    state = Checkpoint(random_llama(root / "base", vocab_size=256, hidden_size=64, intermediate_size=128)).state_dict()
    for i in range(count):
        g = torch.Generator().manual_seed(i + 1)
        tuned = {}
        for k, v in state.items():
            delta = torch.randn(v.shape, generator=g) * 0.01 * (i + 1)
            if zero_fraction is not None:
                delta = delta * (torch.rand(v.shape, generator=g) > zero_fraction)
            tuned[k] = v + delta
        (root / f"ft{i}").mkdir()
        save_state_dict(tuned, root / f"ft{i}", "5GB")
        (root / f"ft{i}" / "config.json").write_text((root / "base" / "config.json").read_text())
    return root
