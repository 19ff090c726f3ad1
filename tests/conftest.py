"""Shared fixtures: the tiny zoo (built once, cached), small random models, quiet libraries."""
from __future__ import annotations

import os

import pytest
import torch

if "HF_HUB_OFFLINE" not in os.environ:  # as the CLI does: offline unless the user chose otherwise
    os.environ["HF_HUB_OFFLINE"] = "1"
    os.environ["WEIGHTSMITH_OFFLINE_BY_DEFAULT"] = "1"
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import transformers  # noqa: E402

transformers.utils.logging.set_verbosity_error()
transformers.utils.logging.disable_progress_bar()


@pytest.fixture(scope="session")
def zoo():
    """The tiny zoo: tokenizer, two bases, domain fine-tunes, soups, MWA checkpoints (cached across runs)."""
    from weightsmith.zoo import build

    return build("tiny")


@pytest.fixture
def tiny_llama(tmp_path):
    """Factory: a random 2-layer Llama folder; keyword arguments override its config."""
    from weightsmith.zoo.synthetic import random_llama

    counter = iter(range(1000))

    def make(name: str | None = None, seed: int = 0, **config):
        return random_llama(tmp_path / (name or f"llama{next(counter)}"), seed=seed, **config)

    return make


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
