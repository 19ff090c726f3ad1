"""Processes of one fold under ``accelerate launch`` (one process per GPU, or gloo processes on CPU),
and the wall clock of each fold stage.

A plain run is one rank of one; nothing distributed is touched unless the launcher set WORLD_SIZE /
LOCAL_RANK.
"""
from __future__ import annotations

import os
import sys
import time
from dataclasses import dataclass

import torch

from ..errors import WeightsmithError


def launched(environ=os.environ) -> bool:
    return int(environ.get("WORLD_SIZE", "1")) > 1 or environ.get("LOCAL_RANK") is not None


def _requested_processes(launcher_argv: list[str]) -> int | None:
    """``--num_processes N`` from an ``accelerate launch`` command line (its own options, before the script)."""
    start = next((i for i, arg in enumerate(launcher_argv)
                  if arg == "launch" or arg.endswith(("accelerate.commands.launch", "accelerate-launch"))), None)
    if start is None:
        return None
    for arg, nxt in zip(launcher_argv[start + 1:], launcher_argv[start + 2:] + [""]):
        if arg in ("-m", "--module") or arg.endswith(".py"):
            break
        for flag in ("--num_processes", "--num-processes"):
            if arg == flag:
                return int(nxt) if nxt.isdigit() else None
            if arg.startswith(flag + "="):
                value = arg.split("=", 1)[1]
                return int(value) if value.isdigit() else None
    return None


def parent_argv() -> list[str]:
    """The command line of the process that started this one ([] where /proc cannot tell)."""
    try:
        with open(f"/proc/{os.getppid()}/cmdline", "rb") as f:
            return [a.decode(errors="replace") for a in f.read().split(b"\0") if a]
    except OSError:
        return []


def cpu_ranks_command(environ, launcher_argv: list[str], argv: list[str]) -> list[str] | None:
    """The ``torch.distributed.run`` command that starts the N gloo ranks ``accelerate launch --cpu
    --num_processes N`` asked for but did not start (accelerate starts CPU ranks only under mpirun and runs
    one plain process otherwise); None when this process is not such a launch."""
    if launched(environ):
        return None
    if environ.get("ACCELERATE_USE_CPU", "").lower() != "true" or "MASTER_ADDR" not in environ:
        return None
    n = _requested_processes(launcher_argv)
    if not n or n < 2:
        return None
    return [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(n), "--master_addr",
            environ["MASTER_ADDR"], "--master_port", environ.get("MASTER_PORT", "29500"), "-m", "weightsmith", *argv]


@dataclass
class Ranks:
    rank: int = 0
    world: int = 1
    device: torch.device = torch.device("cpu")

    @classmethod
    def start(cls, device: str | torch.device = "auto") -> "Ranks":
        if not launched():
            if os.environ.get("ACCELERATE_USE_CPU", "").lower() == "true" and "MASTER_ADDR" in os.environ:
                raise WeightsmithError(
                    "accelerate launch --cpu started one process and the number of processes it was asked for "
                    "cannot be read from its command line; start gloo ranks with `accelerate launch --multi_gpu --num_processes N -m "
                    "weightsmith fold ... --device cpu` or `torchrun --nproc_per_node N -m weightsmith fold ... --device cpu`")
            return cls()
        from accelerate import PartialState

        from ..device import resolve_device

        cpu = resolve_device(device).type == "cpu" or os.environ.get("ACCELERATE_USE_CPU", "").lower() in ("1", "true")
        state = PartialState(cpu=cpu)
        return cls(rank=state.process_index, world=state.num_processes, device=state.device)

    def barrier(self) -> None:
        if self.world > 1:
            torch.distributed.barrier()

    def from_rank0(self, obj):
        """``obj`` as rank 0 holds it, on every rank."""
        if self.world == 1:
            return obj
        box = [obj]
        torch.distributed.broadcast_object_list(box, src=0)
        return box[0]

    def mean(self, values: list[float]) -> list[float]:
        """Each of ``values`` averaged over the ranks (every rank passes as many)."""
        if self.world == 1 or not values:
            return list(values)
        t = torch.tensor(values, dtype=torch.float64)
        torch.distributed.all_reduce(t)
        return (t / self.world).tolist()

    def gather(self, obj) -> list:
        """Every rank's ``obj``, in rank order."""
        if self.world == 1:
            return [obj]
        got = [None] * self.world
        torch.distributed.all_gather_object(got, obj)
        return got


class Clock:
    """Seconds spent in each named stage, in order."""

    def __init__(self):
        self.laps: dict[str, float] = {}
        self._t = time.perf_counter()

    def lap(self, name: str) -> None:
        now = time.perf_counter()
        self.laps[name] = round(self.laps.get(name, 0.0) + now - self._t, 3)
        self._t = now
