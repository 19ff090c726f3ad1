"""The whole-model trim's reading pass reads the next tensor while the current one is counted, but only where
holding both stays within the engine's PREFETCH_BYTES over the largest tensor (as the merge loop does)."""
from __future__ import annotations

import threading
from types import SimpleNamespace

import torch

from weightsmith.merge.execute import PREFETCH_BYTES, read_ahead


def test_read_ahead_yields_every_job_in_order_and_respects_the_memory_rule():
    big = PREFETCH_BYTES // 4  # float32 entries: a tensor of PREFETCH_BYTES
    shapes = [(10,), (big,), (big,), (10,), (10,)]
    jobs = [SimpleNamespace(shape=s, compute=torch.float32, name=f"t{i}") for i, s in enumerate(shapes)]
    loaded: list[str] = []
    gate = threading.Lock()

    def load(j):
        with gate:
            loaded.append(j.name)
        return [j.name, j.name]  # two inputs

    seen = []
    for i, inputs in enumerate(read_ahead(jobs, load)):
        seen.append(inputs[0])
        ahead = {n for n in loaded if n not in seen}
        if i == 1:  # t1 and t2 together (2 × 2 inputs of PREFETCH_BYTES) exceed largest + PREFETCH_BYTES:
            assert ahead == set(), ahead  # t2 is read only once t1 is let go
    assert seen == [j.name for j in jobs] and loaded == seen
