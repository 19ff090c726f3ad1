"""Processes of one fold under ``accelerate launch`` (one process per GPU, or gloo processes on CPU),
and the wall clock of each fold stage.

A plain run is one rank of one; nothing distributed is touched unless the launcher set WORLD_SIZE /
LOCAL_RANK.
"""
from __future__ import annotations

import os
import time
from dataclasses import dataclass

import torch

from ..errors import WeightsmithError


def launched() -> bool:
    return int(os.environ.get("WORLD_SIZE", "1")) > 1 or os.environ.get("LOCAL_RANK") is not None


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
                    "accelerate launch --cpu --num_processes N started one process, not N (accelerate runs CPU ranks "
                    "only under mpirun); start gloo ranks with `accelerate launch --multi_gpu --num_processes N -m "
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
