"""The original's outputs on the heal windows, computed once before the heal: its last ``tail`` hidden states
and its logits, in an unlinked temporary file memory-mapped, so that each heal step runs the student alone
(one forward and its backward instead of two forwards and a backward) and the teacher's weights are no longer
needed while the student trains.
"""
from __future__ import annotations

import os
import tempfile
from types import SimpleNamespace

import torch

from ..progress import ProgressFn, track


def _mapped(shape: tuple[int, ...], dtype: torch.dtype, folder: str | None) -> torch.Tensor:
    """A zero tensor backed by a new file (unlinked at once: the mapping keeps it until the tensor goes)."""
    fd, path = tempfile.mkstemp(suffix=".teacher", dir=folder)
    os.close(fd)
    try:
        return torch.from_file(path, shared=True, size=int(torch.Size(shape).numel()), dtype=dtype).view(shape)
    finally:
        os.unlink(path)


class TeacherCache:
    """``outputs(idx)``: what the teacher gives windows ``idx`` (``hidden_states``: its last ``tail`` hidden
    states, oldest first; ``logits`` for a causal LM), read back from the file one batch at a time."""

    def __init__(self, teacher: torch.nn.Module, windows: torch.Tensor, *, tail: int, causal: bool,
                 batch_size: int = 8, device: str | torch.device = "cpu", folder: str | None = None,
                 progress: ProgressFn | None = None):
        self.hidden: torch.Tensor | None = None
        self.logits: torch.Tensor | None = None
        with torch.no_grad():
            for s in track(progress, "teacher cache", range(0, windows.shape[0], batch_size)):
                out = teacher(input_ids=windows[s:s + batch_size].to(device), output_hidden_states=True)
                hs = torch.stack(out.hidden_states[-min(tail, len(out.hidden_states) - 1):], 1)
                if self.hidden is None:
                    self.hidden = _mapped((windows.shape[0], *hs.shape[1:]), hs.dtype, folder)
                    if causal:
                        self.logits = _mapped((windows.shape[0], *out.logits.shape[1:]), out.logits.dtype, folder)
                self.hidden[s:s + batch_size] = hs.cpu()
                if causal:
                    self.logits[s:s + batch_size] = out.logits.cpu()

    def outputs(self, idx: torch.Tensor, device: str | torch.device = "cpu") -> SimpleNamespace:
        return SimpleNamespace(hidden_states=tuple(self.hidden[idx].to(device).unbind(1)),
                               logits=None if self.logits is None else self.logits[idx].to(device))
