"""Measured block importance: the calibration loss with blocks taken out (the criterion of Shortened
LLaMA, Kim et al. 2024, extended to encoders and to sets of blocks).

One forward pass records every block's input. The loss with a set R of blocks removed then re-runs only
the blocks after the first removed one: earlier blocks replay the recorded states, removed blocks pass
their input through, so taking out block i costs the N-1-i blocks after it, not the whole model.
Causal LMs: the LM loss. Encoders: 1 - cos of the pooled sentence embedding (the folder's
sentence-transformers pooling) to the original model's.

k blocks: the best of every contiguous span of k blocks and of a beam search that takes out one block at
a time (width ``beam``; width 1 is greedy), extending sets only with the k + beam blocks whose removal
alone costs least. Sets of two or more blocks are compared on every other recorded window (they are only
ranked against each other; the same windows whatever the batch size), which keeps a two-block search
within 3x one forward pass. Every set evaluated is cached. The recorded inputs wait in a temporary file
(``SpilledStates``), read back one batch's block input at a time: they are the size of the model for
long calibration sets.
"""
from __future__ import annotations

import tempfile

import torch
import torch.nn.functional as F

from ..progress import ProgressFn, report
from .blocks import block_list, is_causal_lm
from ..pooling import Pooling


def _passthrough(tail):
    def forward(*args, **kwargs):
        h = args[0] if args else kwargs["hidden_states"]
        return h if tail is None else (h,) + tail
    return forward


def _replay(state, tail):
    def forward(*args, **kwargs):
        return state[0] if tail is None else (state[0],) + tail
    return forward


def calibration_forward(model: torch.nn.Module, x: torch.Tensor, causal: bool):
    """The model's output on the windows ``x``, with the LM loss for a causal LM."""
    return model(input_ids=x, labels=x, use_cache=False) if causal else model(input_ids=x)


def window_loss(out, causal: bool, pooling: Pooling, reference: torch.Tensor | None) -> torch.Tensor:
    """The calibration loss of one batch's output: its LM loss, or (encoders) the mean 1 - cos of its pooled
    embeddings to the original's ``reference``."""
    if causal:
        return out.loss
    return (1 - F.cosine_similarity(pooling(out.last_hidden_state.float()), reference, dim=-1)).mean()


class SpilledStates:
    """Tensors written once to an unlinked temporary file and read back one at a time (not memory-mapped: a
    read holds only the tensor asked for)."""

    def __init__(self):
        self.file = tempfile.TemporaryFile()
        self.where: list[tuple[int, int, torch.dtype, tuple[int, ...]]] = []

    def add(self, t: torch.Tensor) -> int:
        data = t.detach().cpu().contiguous().view(torch.uint8).numpy().tobytes()
        self.file.seek(0, 2)
        self.where.append((self.file.tell(), len(data), t.dtype, tuple(t.shape)))
        self.file.write(data)
        return len(self.where) - 1

    def get(self, index: int) -> torch.Tensor:
        offset, size, dtype, shape = self.where[index]
        self.file.seek(offset)
        buf = bytearray(size)
        self.file.readinto(buf)
        return torch.frombuffer(buf, dtype=torch.uint8).view(dtype).view(shape)

    def close(self) -> None:
        self.file.close()


class RemovalProbe:
    """Calibration loss of ``model`` with any set of blocks removed, on ``windows`` (no padding)."""

    def __init__(self, model: torch.nn.Module, windows: torch.Tensor, *, batch_size: int = 8,
                 device: str | torch.device = "cpu", pooling: Pooling | None = None,
                 progress: ProgressFn | None = None):
        self.model, self.device = model, torch.device(device)
        self.blocks = block_list(model)
        self.n = len(self.blocks)
        self.causal = is_causal_lm(model)
        self.pooling = pooling or Pooling()
        self.batches = [windows[s:s + batch_size] for s in range(0, windows.shape[0], batch_size)]
        self.weights = [b.shape[0] / windows.shape[0] for b in self.batches]
        self.progress = progress
        self.cache: dict[frozenset, float] = {}
        self.evaluated = 0
        self._capture()

    @torch.no_grad()
    def _capture(self) -> None:
        """Block inputs (spilled to a temporary file, in the model's dtype), output structure, reference outputs."""
        self.spilled = SpilledStates()
        self.states: list[list[int]] = []  # [batch][block] -> index in self.spilled
        self.tails: list = [None] * self.n
        self.reference: list[torch.Tensor] = []
        base = 0.0
        current: list[int] = []

        def pre(i):
            def hook(mod, args, kwargs):
                current.append(self.spilled.add(args[0] if args else kwargs["hidden_states"]))
            return hook

        def post(i):
            def hook(mod, args, out):
                self.tails[i] = tuple(None for _ in out[1:]) if isinstance(out, tuple) else None
            return hook

        handles = [b.register_forward_pre_hook(pre(i), with_kwargs=True) for i, b in enumerate(self.blocks)]
        handles += [b.register_forward_hook(post(i)) for i, b in enumerate(self.blocks)]
        was_training = self.model.training
        self.model.eval()
        try:
            for bi, x in enumerate(self.batches):
                current.clear()
                out = self._forward(x)
                self.states.append(list(current))
                if self.causal:
                    base += self.weights[bi] * out.loss.item()
                else:
                    self.reference.append(self.pooling(out.last_hidden_state.float()))
                report(self.progress, "loss importance", bi + 1, len(self.batches))
        finally:
            for h in handles:
                h.remove()
            self.model.train(was_training)
        self.cache[frozenset(), 1] = base

    def _forward(self, x: torch.Tensor):
        return calibration_forward(self.model, x.to(self.device), self.causal)

    @torch.no_grad()
    def loss(self, removed, every: int | None = None) -> float:
        """Calibration loss with the blocks in ``removed`` taken out (cached), on every ``every``-th window
        (default: all of them for one block, every other one for sets of two or more)."""
        every = every or (2 if len(removed) > 1 and sum(b.shape[0] for b in self.batches) > 1 else 1)
        key = frozenset(removed)
        if (key, every) in self.cache:
            return self.cache[key, every]
        first = min(key)
        slot: list[torch.Tensor] = [None]
        for i in range(self.n):
            if i in key or i < first - 1:
                self.blocks[i].forward = _passthrough(self.tails[i])
            elif i == first - 1:
                self.blocks[i].forward = _replay(slot, self.tails[i])
        was_training = self.model.training
        self.model.eval()
        total, count, offset = 0.0, 0, 0
        try:
            for bi, x in enumerate(self.batches):
                rows = slice((-offset) % every, None, every)  # the batch's windows at global multiples of every
                offset += x.shape[0]
                n = len(range(x.shape[0])[rows])
                if n:
                    total += n * self._removed_loss(bi, rows, first, slot)
                    count += n
        finally:
            for b in self.blocks:
                b.__dict__.pop("forward", None)
            self.model.train(was_training)
        self.cache[key, every] = total / count
        self.evaluated += 1
        return total / count

    def _removed_loss(self, bi: int, rows: slice, first: int, slot: list) -> float:
        """Mean loss of windows ``rows`` of batch ``bi``, replaying the recorded input of block ``first``."""
        x = self.batches[bi][rows]
        slot[0] = self.spilled.get(self.states[bi][first])[rows].to(self.device)
        reference = None if self.causal else self.reference[bi][rows]
        return window_loss(self._forward(x), self.causal, self.pooling, reference).item()

    def choose(self, k: int, beam: int = 2) -> tuple[list[int], dict]:
        """The ``k`` blocks whose removal costs the least calibration loss, and the losses behind it."""
        singles = [self.loss({i}) for i in range(self.n)]
        scores = {"loss_base": round(self.cache[frozenset(), 1], 6), "loss_without_block": [round(v, 6) for v in singles]}
        if k == 0:
            return [], scores
        by_single = sorted(range(self.n), key=lambda i: (singles[i], i))
        frontier = [frozenset({i}) for i in by_single[:beam]]
        pool = by_single[:k + beam]
        for _ in range(k - 1):
            cands = {f | {j} for f in frontier for j in pool if j not in f}
            frontier = sorted(cands, key=lambda s: (self.loss(s), sorted(s)))[:beam]
        spans = [frozenset(range(l, l + k)) for l in range(self.n - k + 1)]
        best = min(list(frontier) + spans, key=lambda s: (self.loss(s), sorted(s)))
        scores.update(loss_removed=round(self.loss(best, every=1), 6), sets_evaluated=self.evaluated)
        return sorted(best), scores


def loss_importance(model: torch.nn.Module, windows: torch.Tensor, k: int, *, batch_size: int = 8,
                    device: str | torch.device = "cpu", pooling: Pooling | None = None, beam: int = 2,
                    stride: int = 2, progress: ProgressFn | None = None) -> tuple[list[int], dict]:
    """Blocks to remove by measured calibration loss, and the losses behind the choice.

    Measured on every ``stride``-th calibration window (half of them by default): the losses of removing
    different blocks differ by far more than the sampling noise, and it keeps this importance within about
    2x the cost of one forward pass over all the windows (ShortGPT BI's cost).
    """
    probe = RemovalProbe(model, windows[::stride], batch_size=batch_size, device=device, pooling=pooling, progress=progress)
    try:
        return probe.choose(k, beam=beam)
    finally:
        probe.spilled.close()
