"""Shared fixtures: the tiny zoo (built once, cached), small random models, quiet libraries."""
from __future__ import annotations

import os

import pytest
import torch

if "HF_HUB_OFFLINE" not in os.environ:  # as the CLI does: offline unless the user chose otherwise
    os.environ["HF_HUB_OFFLINE"] = "1"
    os.environ["WEIGHTSMITH_OFFLINE_BY_DEFAULT"] = "1"
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# Nothing in the tests reaches the internet: a Hub name that is not served by a test's own loopback Hub meets a
# closed port (connection refused at once), whatever the machine's network.
os.environ["HF_ENDPOINT"] = "http://127.0.0.1:9"

import transformers  # noqa: E402

transformers.utils.logging.set_verbosity_error()
transformers.utils.logging.disable_progress_bar()


@pytest.fixture(scope="session")
def zoo():
    """The tiny zoo: tokenizer, two bases, domain fine-tunes, soups, MWA checkpoints (cached across runs)."""
    from weightsmith.zoo import build

    threads = torch.get_num_threads()
    torch.set_num_threads(os.cpu_count() or 1)  # training the zoo is the one heavy job: give it every core
    try:
        return build("tiny")
    finally:
        torch.set_num_threads(threads)


@pytest.fixture
def tiny_llama(tmp_path):
    """Factory: a random 2-layer Llama folder; keyword arguments override its config."""
    from weightsmith.zoo.synthetic import random_llama

    counter = iter(range(1000))

    def make(name: str | None = None, seed: int = 0, **config):
        return random_llama(tmp_path / (name or f"llama{next(counter)}"), seed=seed, **config)

    return make


@pytest.fixture(autouse=True)
def _seed_and_one_thread():
    """Seeded; one thread, which is fastest for tiny models and keeps tests off each other's cores."""
    torch.manual_seed(0)
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
