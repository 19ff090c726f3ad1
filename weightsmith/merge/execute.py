"""The merge engine: runs a ``plan.MergePlan`` one tensor at a time, each job's inputs through its method, into
a sharded writer. It knows no recipe and no method by name: a job names its inputs and keyword arguments.

Peak memory is the inputs' copies of the largest tensor (in the job's arithmetic dtype, on the device) plus
the result; reading, the math of two tensors (on CPU) and writing overlap while that peak allows.
"""
from __future__ import annotations

import collections
import zlib
from concurrent.futures import ThreadPoolExecutor

import torch

from ..checkpoint import Checkpoint, ShardedWriter
from ..progress import ProgressFn, report
from .native import mixing
from .values import ValueChecks, zero_requested

PREFETCH_BYTES = 256 * 2**20
IN_FLIGHT = 2  # tensors merged at once on CPU


class _Ready:
    """A deferred load run when its result is asked for (no overlap for very large tensors)."""

    def __init__(self, fn, arg):
        self.fn, self.arg = fn, arg

    def result(self):
        return self.fn(self.arg)


def _generator(seed: int, name: str, index: int) -> torch.Generator:
    """One generator per (seed, tensor, model): the same seed gives the same output in any order."""
    g = torch.Generator()
    g.manual_seed((seed * 1_000_003 + zlib.crc32(f"{name}#{index}".encode())) % (2**63))
    return g


def run_job(plan, job, tensors: list[torch.Tensor], base: torch.Tensor | None, seed: int) -> torch.Tensor:
    """Apply the method to one tensor's inputs (already cropped and in the job's dtype on the device)."""
    if not job.float_math:
        return (base if base is not None else tensors[0])
    kwargs = dict(job.kwargs)
    method = plan.method
    if method.random:
        kwargs["generators"] = [_generator(seed, job.name, i) for i in range(len(tensors))]
    mergekit = plan.compat == "mergekit" and (job.compute != torch.float32 or not method.compat_fast)
    fn = method.reference if (mergekit and method.reference is not None) else method.fn
    return fn(tensors, base, **kwargs) if base is not None else fn(tensors, **kwargs)


def _read(ckpt: Checkpoint, job, device: torch.device, name: str) -> torch.Tensor:
    """The tensor (in the job's compute dtype for float math) on ``device``, cropped to the job's rows,
    which the method may overwrite: on CPU a tensor already in that dtype (or non-float) is a private
    copy-on-write mapping of the file, so reading it copies nothing and the file never changes;
    otherwise an owned copy (on CPU converted from that mapping in one pass)."""
    if device.type == "cpu" and (not job.float_math or ckpt.info(name).torch_dtype == job.compute):
        return ckpt.map(name, job.rows)
    if device.type == "cpu":  # converted straight from the mapped file: one pass, no intermediate copy
        return ckpt.map(name, job.rows).to(job.compute)
    return ckpt.read(name, job.rows, job.compute if job.float_math else None, device)


class Inputs:
    """Each job's input tensors (base first when the job has one), read on ``device``."""

    def __init__(self, jobs: list, device: torch.device):
        self.device = device
        self.largest = max((self.footprint(j) for j in jobs), default=0)

    def read(self, job) -> list[torch.Tensor]:
        """The job's inputs as stored (no vocabulary re-indexing)."""
        return [_read(c, job, self.device, n) for c, n in job.inputs]

    def load(self, job) -> list[torch.Tensor]:
        xs = self.read(job)
        return job.prepare(xs) if job.prepare is not None else xs

    def footprint(self, job) -> int:
        return job.compute.itemsize * len(job.inputs) * torch.Size(job.shape).numel()

    def fits(self, held: list) -> bool:
        """Whether holding these jobs' inputs at once keeps the peak within PREFETCH_BYTES of the largest job's."""
        return sum(self.footprint(j) for j in held) <= self.largest + PREFETCH_BYTES

    def split(self, job, inputs: list[torch.Tensor]) -> tuple[torch.Tensor | None, list[torch.Tensor]]:
        """(base or None, the other tensors) of a job's loaded inputs."""
        return (inputs[0], inputs[1:]) if job.base_in else (None, inputs)


def read_ahead(jobs: list, load):
    """``load(job)`` of each job in order, the next one's read in the background while the current one is used,
    where holding both raises the peak memory by at most PREFETCH_BYTES over the largest job's inputs (the
    merge loop's own rule). A method's reading pass (``prepass``) streams through it."""
    size = [torch.Size(j.shape).numel() * j.compute.itemsize for j in jobs]
    largest = max(size, default=0)
    with ThreadPoolExecutor(max_workers=1) as pool:
        pending = pool.submit(load, jobs[0]) if jobs else None
        for i in range(len(jobs)):
            inputs = pending.result() if pending is not None else load(jobs[i])
            width = len(inputs)
            ahead = i + 1 < len(jobs) and (size[i] + size[i + 1]) * width <= largest * width + PREFETCH_BYTES
            pending = pool.submit(load, jobs[i + 1]) if ahead else None
            yield inputs
            del inputs


def prepass(plan, inputs: Inputs, progress: ProgressFn | None) -> None:
    """The method's reading pass before the merge (TIES' whole-model trim), over the float jobs."""
    if plan.method.prepass is not None:
        plan.method.prepass([j for j in plan.jobs if j.float_math], lambda jobs: read_ahead(jobs, inputs.read),
                            progress)


def execute(plan, inputs: Inputs, writer: ShardedWriter, checks: ValueChecks, *, seed: int,
            progress: ProgressFn | None = None) -> None:
    """Merge every job of ``plan`` into ``writer``, results written in the plan's order. Reading the next
    tensor, writing the last result and, on CPU, the math of two tensors overlap (one tensor's sort replays
    and reductions leave cores idle that the next one's fill), unless that would raise the peak memory:
    the inputs held at once stay within PREFETCH_BYTES of the largest job's (``Inputs.fits``)."""
    label = f"merge {plan.method.name}"
    jobs = plan.jobs
    report(progress, label, 0, len(jobs))
    in_flight = IN_FLIGHT if inputs.device.type == "cpu" else 1
    order = {job.name: i for i, job in enumerate(jobs)}

    def compute(job, loaded: list[torch.Tensor]) -> torch.Tensor:
        base, tensors = inputs.split(job, loaded)
        return checks.run(job.name, loaded, lambda: run_job(plan, job, tensors, base, seed).to(job.dtype).cpu(),
                          [c.path for c, _ in job.inputs], zero_requested(job.kwargs))
    try:
        with ThreadPoolExecutor(max_workers=1) as reader, ThreadPoolExecutor(max_workers=1) as writing, \
                ThreadPoolExecutor(max_workers=in_flight) as math:
            running: collections.deque = collections.deque()  # (job, future of its result), in plan order
            written = None
            done = 0

            def finish_oldest() -> None:
                nonlocal written, done
                job, future = running.popleft()
                result = future.result()
                if written is not None:
                    written.result()
                written = writing.submit(writer.write, job.name, result)
                done += 1
                report(progress, label, done, len(jobs))

            pending = reader.submit(inputs.load, jobs[0]) if jobs else None
            for i, job in enumerate(jobs):
                if isinstance(pending, _Ready):  # read only once it fits beside what is still running
                    while running and not inputs.fits([j for j, _ in running] + [job]):
                        finish_oldest()
                loaded = pending.result()
                nxt = jobs[i + 1] if i + 1 < len(jobs) else None
                # wait for older tensors while this one would not fit beside them (with the next one read ahead)
                while running and (len(running) >= in_flight or not inputs.fits([j for j, _ in running] + [job])):
                    finish_oldest()
                pending = None
                if nxt is not None:
                    pending = (reader.submit(inputs.load, nxt) if inputs.fits([j for j, _ in running] + [job, nxt])
                               else _Ready(inputs.load, nxt))
                running.append((job, math.submit(compute, job, loaded)))
                del loaded
            while running:
                finish_oldest()
            if written is not None:
                written.result()
    finally:
        mixing.release_scratch()
    checks.report.sort(key=lambda r: order.get(r["tensor"], len(order)))  # tensors finish in any order
