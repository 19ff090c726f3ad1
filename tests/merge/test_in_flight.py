"""The merge loop runs two tensors' math at once on CPU, writes results in the plan's order, and never holds
more inputs than the largest job's plus PREFETCH_BYTES."""
from __future__ import annotations

import threading
import time
from types import SimpleNamespace

import pytest
import torch

from weightsmith.merge import execute as engine
from weightsmith.merge.plan import TensorJob


class Inputs:
    """Stands in for engine.Inputs: loads record what is held, footprints follow the real rule."""

    def __init__(self, jobs, device="cpu"):
        self.device = torch.device(device)
        self.largest = max(self.footprint(j) for j in jobs)
        self.lock = threading.Lock()
        self.held: dict[str, int] = {}
        self.peak = 0

    footprint = engine.Inputs.footprint
    fits = engine.Inputs.fits

    def load(self, job):
        with self.lock:
            self.held[job.name] = self.footprint(job)
            self.peak = max(self.peak, sum(self.held.values()))
        return [torch.zeros(1)]

    def split(self, job, loaded):
        return None, loaded


class Checks:
    def __init__(self, inputs):
        self.inputs, self.report = inputs, []

    def run(self, name, loaded, merge, paths, zero_ok):
        try:
            return merge()
        finally:
            with self.inputs.lock:
                self.inputs.held.pop(name)


def _run(jobs, device="cpu", delay=None, fail=None, monkeypatch=None):
    inputs = Inputs(jobs, device)
    running, most = set(), [0]
    gate = threading.Lock()

    def run_job(plan, job, tensors, base, seed):
        with gate:
            running.add(job.name)
            most[0] = max(most[0], len(running))
        try:
            time.sleep((delay or {}).get(job.name, 0.02))
            if job.name == fail:
                raise RuntimeError(f"{job.name} failed")
            return torch.tensor([float(job.name[1:])])
        finally:
            with gate:
                running.discard(job.name)
    monkeypatch.setattr(engine, "run_job", run_job)
    written = []
    writer = SimpleNamespace(write=lambda name, t: written.append((name, float(t))))
    plan = SimpleNamespace(method=SimpleNamespace(name="test"), jobs=jobs)
    engine.execute(plan, inputs, writer, Checks(inputs), seed=0)
    return written, most[0], inputs.peak, inputs.largest


def _jobs(sizes):
    return [TensorJob(name=f"t{i}", shape=(n,), dtype=torch.float32, kwargs={}, compute=torch.float32,
                      inputs=[(SimpleNamespace(path="m"), f"t{i}")] * 2)
            for i, n in enumerate(sizes)]


def test_small_tensors_overlap_and_are_written_in_order(monkeypatch):
    jobs = _jobs([100] * 6)
    # the first tensor is the slowest: the later ones finish first but are written after it
    written, most, _, _ = _run(jobs, delay={"t0": 0.2}, monkeypatch=monkeypatch)
    assert [n for n, _ in written] == [j.name for j in jobs]
    assert [v for _, v in written] == [float(i) for i in range(6)]
    assert most == engine.IN_FLIGHT == 2


def test_large_tensors_wait_for_each_other(monkeypatch):
    big = engine.PREFETCH_BYTES // 4 + 1  # float32: one input of a big job is over PREFETCH_BYTES
    jobs = _jobs([10, big, big, 10, 10])
    written, most, peak, largest = _run(jobs, monkeypatch=monkeypatch)
    assert [n for n, _ in written] == [j.name for j in jobs]
    assert peak <= largest + engine.PREFETCH_BYTES
    assert peak >= largest  # a big job was held (with small ones beside it when they fit)


def test_accelerators_run_one_tensor_at_a_time(monkeypatch):
    jobs = _jobs([100] * 4)
    written, most, _, _ = _run(jobs, device="meta", monkeypatch=monkeypatch)
    assert most == 1 and [n for n, _ in written] == [j.name for j in jobs]


def test_a_failing_tensor_stops_the_merge(monkeypatch):
    with pytest.raises(RuntimeError, match="t2 failed"):
        _run(_jobs([100] * 5), fail="t2", monkeypatch=monkeypatch)
