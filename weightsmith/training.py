"""Shared training machinery: text -> calibration windows, random training windows, the warmup + cosine
schedule and the one causal-LM training loop (used by the zoo, RPS healing/training, and calibration for
analyze, fold, align and PLeaS).
"""
from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch

from .errors import OptionError, literal
from .progress import ProgressFn, report


def token_stream(tokenizer, texts: list[str], max_tokens: int, sep: int | None) -> list[int]:
    """The texts' token ids joined by ``sep`` (None: nothing between texts), stopping once ``max_tokens`` is
    reached (the last text may run past it)."""
    ids: list[int] = []
    for t in texts:
        if ids and sep is not None:
            ids.append(sep)
        ids.extend(tokenizer(t, add_special_tokens=False, verbose=False)["input_ids"])
        if len(ids) >= max_tokens:
            break
    return ids


def calibration_windows(tokenizer, data: str | Path, *, seq_len: int, max_tokens: int,
                        causal: bool = True) -> torch.Tensor:
    """[windows, seq_len] token ids from the text file(s) at ``data`` (at most ``max_tokens`` tokens in all):
    one stream (texts joined by EOS for causal models) cut into equal windows. Encoders get each window
    wrapped in their [CLS] ... [SEP] tokens so they see the inputs they were trained on."""
    from .eval import load_texts

    texts = load_texts(data, max_tokens=max_tokens)
    wrap = [] if causal else [t for t in (tokenizer.cls_token_id, tokenizer.sep_token_id) if t is not None]
    body = seq_len - len(wrap)
    if body < 2:
        raise OptionError("seq_len", f"{seq_len} is too short for calibration windows")
    ids = token_stream(tokenizer, texts, max_tokens, tokenizer.eos_token_id if causal else None)
    n = min(len(ids), max_tokens) // seq_len
    if n < 1:
        raise OptionError(None, f"{literal(data)}: only {len(ids)} tokens, fewer than one window of {{0}} {seq_len}",
                          ("seq_len",))
    stream = torch.tensor(ids[:n * body], dtype=torch.long).view(n, body)
    if wrap:
        cls = torch.full((n, 1), wrap[0], dtype=torch.long)
        sep_col = torch.full((n, 1), wrap[-1], dtype=torch.long)
        stream = torch.cat([cls, stream, sep_col], dim=1) if len(wrap) == 2 else torch.cat([cls, stream], dim=1)
    return stream


@dataclass
class Sentences:
    """Calibration as separate inputs, the way an encoder is used: each non-empty line of the data is one
    input ([CLS] line [SEP], truncated to the window); a batch is padded to its longest input."""
    ids: list[list[int]]
    pad_id: int
    head: int = 1  # special tokens before each input's text ([CLS]) and after it ([SEP])
    tail: int = 1

    def __len__(self) -> int:
        return len(self.ids)

    def spliced(self, idx: list[int], share: float, gen: torch.Generator) -> Sentences:
        """The inputs at ``idx``, where each one with probability ``share`` is replaced by a new input: the
        start of its text (a random cut) followed by the end of another random input's text (a random cut),
        inside the special tokens, no longer than the longer of the two (the start is cut shorter to fit).
        Distilling on such inputs as well shows the student the teacher's function off the calibration
        sentences themselves."""
        out = []
        draws = torch.rand(len(idx), generator=gen).tolist()
        for i, u in zip(idx, draws):
            a = self.ids[i]
            if u >= share:
                out.append(a)
                continue
            b = self.ids[int(torch.randint(0, len(self.ids), (1,), generator=gen))]
            body_a, body_b = a[self.head:len(a) - self.tail], b[self.head:len(b) - self.tail]
            if not body_a or not body_b:
                out.append(a)
                continue
            cut_a = int(torch.randint(1, len(body_a) + 1, (1,), generator=gen))
            cut_b = int(torch.randint(0, len(body_b), (1,), generator=gen))
            limit, end = max(len(body_a), len(body_b)), body_b[cut_b:]
            start = body_a[:max(1, min(cut_a, limit - len(end)))]
            body = start + end[max(0, len(start) + len(end) - limit):]
            out.append(a[:self.head] + body + a[len(a) - self.tail:])
        return Sentences(out, self.pad_id, self.head, self.tail)

    def batch(self, idx: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
        """(input_ids, attention_mask) of the inputs at ``idx``."""
        rows = [self.ids[i] for i in idx]
        width = max(map(len, rows))
        x = torch.full((len(rows), width), self.pad_id, dtype=torch.long)
        mask = torch.zeros((len(rows), width), dtype=torch.long)
        for r, ids in enumerate(rows):
            x[r, :len(ids)] = torch.tensor(ids, dtype=torch.long)
            mask[r, :len(ids)] = 1
        return x, mask


    def groups(self, idx: list[int], waste: float = 1.3) -> list[list[int]]:
        """``idx`` split into groups of similar lengths (longest first), each padded to at most ``waste`` times
        its real tokens: one padded batch of short and long inputs is mostly padding."""
        order = sorted(idx, key=lambda i: -len(self.ids[i]))
        out: list[list[int]] = []
        real = 0
        for i in order:
            n = len(self.ids[i])
            if out and (len(out[-1]) + 1) * len(self.ids[out[-1][0]]) <= waste * (real + n):
                out[-1].append(i)
                real += n
            else:
                out.append([i])
                real = n
        return out


def calibration_sentences(tokenizer, data: str | Path, *, seq_len: int, max_tokens: int) -> Sentences:
    """The lines of the text file(s) at ``data`` as separate encoder inputs, up to ``max_tokens`` tokens."""
    from .eval import load_texts

    ids: list[list[int]] = []
    total = 0
    for line in (ln.strip() for t in load_texts(data, max_tokens=max_tokens) for ln in t.splitlines()):
        if line and total < max_tokens:
            ids.append(tokenizer(line, truncation=True, max_length=seq_len)["input_ids"])
            total += len(ids[-1])
    if not ids:
        raise OptionError(None, f"{data}: no line of text to calibrate on")
    return Sentences(ids, tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0,
                     *special_counts(tokenizer))


def special_counts(tokenizer) -> tuple[int, int]:
    """How many special tokens the tokenizer puts before and after a text (1 and 1 for BERT's [CLS] ... [SEP])."""
    plain = tokenizer("a", add_special_tokens=False)["input_ids"]
    full = tokenizer("a")["input_ids"]
    for head in range(len(full) - len(plain) + 1):
        if full[head:head + len(plain)] == plain:
            return head, len(full) - head - len(plain)
    return 0, 0


def random_windows(tokens: torch.Tensor, batch_size: int, seq_len: int, gen: torch.Generator) -> torch.Tensor:
    """``batch_size`` windows of ``seq_len`` tokens at random starts of the stream ``tokens``."""
    starts = torch.randint(0, tokens.numel() - seq_len - 1, (batch_size,), generator=gen)
    return torch.stack([tokens[s:s + seq_len] for s in starts.tolist()])


def lr_at(step: int, steps: int, lr: float, warmup: int) -> float:
    """Linear warmup over ``warmup`` steps, then cosine decay from ``lr`` to 0.1·``lr``."""
    if step < warmup:
        return lr * (step + 1) / warmup
    frac = (step - warmup) / max(1, steps - warmup)
    return lr * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * frac)))


def _optimizer(params: list[torch.nn.Parameter], name: str, lr: float, momentum: float,
               weight_decay: float) -> torch.optim.Optimizer:
    if name == "sgd":
        return torch.optim.SGD(params, lr=lr, momentum=momentum)
    return torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay, betas=(0.9, 0.98))


def train_lm(model: torch.nn.Module, tokens: torch.Tensor, *, steps: int, lr: float, batch_size: int,
             seq_len: int, seed: int, warmup: int | None = None, optimizer: str = "adamw", momentum: float = 0.0,
             weight_decay: float = 0.0, device: torch.device | None = None,
             on_step: Callable[[int, float], None] | None = None, progress: ProgressFn | None = None,
             label: str = "training") -> list[float]:
    """Train the trainable parameters of a causal LM in place on random windows of ``tokens`` (warmup +
    cosine, gradient norm clipped at 1); returns the per-step losses. ``optimizer``: 'adamw' (betas 0.9, 0.98)
    or 'sgd' (with ``momentum``). ``device``: where the windows go (None: where ``tokens`` are).
    ``on_step(step, loss)`` runs after each update. Same seed, same windows, same result."""
    gen = torch.Generator().manual_seed(seed)
    params = [p for p in model.parameters() if p.requires_grad]
    opt = _optimizer(params, optimizer, lr, momentum, weight_decay)
    warmup = warmup if warmup is not None else max(1, steps // 20)
    model.train()
    losses: list[float] = []
    try:
        for step in range(steps):
            for g in opt.param_groups:
                g["lr"] = lr_at(step, steps, lr, warmup)
            x = random_windows(tokens, batch_size, seq_len, gen)
            x = x.to(device) if device is not None else x
            loss = model(input_ids=x, labels=x).loss
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(params, 1.0)
            opt.step()
            losses.append(loss.item())
            if on_step is not None:
                on_step(step + 1, losses[-1])
            report(progress, label, step + 1, steps)
    finally:
        model.eval()
    return losses
