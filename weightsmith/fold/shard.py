"""How a heal holds its weights across processes: replicated (``accelerate``'s data-parallel wrapper: every
rank a whole copy, gradients averaged) or sharded (torch FSDP2 ``fully_shard`` per block group and over the
root: parameters, gradients and optimizer states each split across the ranks; the teacher sharded the same
way and run without gradients).

Both train each rank on its own equal slice of every batch, so N processes take the steps one process would.
"""
from __future__ import annotations

import contextlib
import os

import torch

from .blocks import block_list


def fsdp_requested(flag: bool) -> bool:
    """The fsdp option, or a launch that asked for FSDP (``accelerate launch --use_fsdp``)."""
    return flag or os.environ.get("ACCELERATE_USE_FSDP", "").lower() in ("1", "true")


def local_bytes(t: torch.Tensor) -> int:
    """Bytes this rank holds of ``t`` (its shard of a sharded tensor)."""
    from torch.distributed.tensor import DTensor

    local = t.to_local() if isinstance(t, DTensor) else t
    return local.numel() * local.element_size()


def state_bytes(model: torch.nn.Module, opt: torch.optim.Optimizer) -> dict[str, int]:
    """Bytes this rank holds of ``model``'s parameters, their gradients and ``opt``'s states."""
    params = list(model.parameters())
    moments = [v for s in opt.state.values() for v in s.values() if isinstance(v, torch.Tensor) and v.dim()]
    return {"params": sum(local_bytes(p) for p in params),
            "grads": sum(local_bytes(p.grad) for p in params if p.grad is not None),
            "optimizer": sum(local_bytes(v) for v in moments)}


def optimizer(params, lr: float, name: str = "adamw") -> torch.optim.Optimizer:
    """AdamW, or Adafactor (its second moment a row and a column vector per matrix, no first moment), stepping
    one parameter at a time: the multi-tensor form's temporaries (a copy of the moments of every parameter at
    once) would cost as much memory as the moments themselves."""
    if name == "adafactor":
        return torch.optim.Adafactor(params, lr=lr, weight_decay=0.0, foreach=False)
    return torch.optim.AdamW(params, lr=lr, weight_decay=0.0, foreach=False)


class Replicated:
    """Every rank a whole model; ``accelerate`` averages the gradients (one plain process: no wrapper)."""

    sharded = False

    def __init__(self, device: torch.device):
        from accelerate import Accelerator

        self.accelerator = Accelerator(cpu=device.type == "cpu")
        self.device = self.accelerator.device

    def prepare(self, student, teacher, params, lr: float, name: str = "adamw"):
        opt = optimizer(params, lr, name)
        student, opt = self.accelerator.prepare(student, opt)
        return student, None if teacher is None else teacher.to(self.device), opt, params

    def no_sync(self, student, last: bool):
        return contextlib.nullcontext() if last else self.accelerator.no_sync(student)

    def backward(self, loss: torch.Tensor) -> None:
        self.accelerator.backward(loss)

    def clip(self, params, max_norm: float) -> float:
        return float(self.accelerator.clip_grad_norm_(params, max_norm))


class Sharded:
    """FSDP2: each block group (the blocks sharing weights) and then the rest of the model one sharded unit."""

    sharded = True

    def __init__(self, device: torch.device):
        self.device = device

    @staticmethod
    def shard(model: torch.nn.Module) -> None:
        from torch.distributed.fsdp import fully_shard

        groups = (getattr(model.config, "weightsmith", None) or {}).get("groups")
        blocks = block_list(model)
        for group in groups or [[i] for i in range(len(blocks))]:
            fully_shard([blocks[i] for i in group] if len(group) > 1 else blocks[group[0]])
        fully_shard(model)

    def prepare(self, student, teacher, params, lr: float, name: str = "adamw"):
        self.shard(student)  # each rank copies out its shards: the student no longer holds the teacher's tensors
        if teacher is not None:  # None: its outputs are cached
            self.shard(teacher)
        params = [p for p in student.parameters() if p.requires_grad]  # sharding made new parameters
        return student, teacher, optimizer(params, lr, name), params

    def no_sync(self, student, last: bool):
        student.set_requires_gradient_sync(last)
        return contextlib.nullcontext()

    def backward(self, loss: torch.Tensor) -> None:
        loss.backward()

    def clip(self, params, max_norm: float) -> float:
        from torch.distributed.tensor import DTensor

        norm = torch.nn.utils.clip_grad_norm_(params, max_norm)
        return float(norm.full_tensor() if isinstance(norm, DTensor) else norm)

    @staticmethod
    def gather(model: torch.nn.Module, rank: int) -> dict[str, torch.Tensor]:
        """Every parameter whole (each shared one once, under its first name), on rank 0; gathered one tensor at
        a time, so the other ranks never hold more than one."""
        from torch.distributed.tensor import DTensor

        out = {}
        for name, p in model.named_parameters():
            full = p.detach().full_tensor() if isinstance(p, DTensor) else p.detach()
            if rank == 0:
                out[name] = full.cpu()
        return out
