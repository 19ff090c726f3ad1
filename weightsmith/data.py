"""Data files and the calibration streams cut from them: plain text (file or folder), jsonl with a ``text`` field,
labelled jsonl/CSV and image folders; token streams, equal windows for causal models and separate sentences for
encoders. Every stage that reads data (eval, training, analyze, fold, align, PLeaS, MoE routing) reads it here."""
from __future__ import annotations

import csv
import json
from dataclasses import dataclass
from pathlib import Path

import torch

from .errors import OptionError, WeightsmithError, literal


# Characters read per token asked for: real text averages under 8 per token, so a budget of ``max_tokens`` never
# runs short, while a huge one-line file costs time and memory for what is used, not for its size.
CHARS_PER_TOKEN = 32


def load_texts(path: str | Path, field: str = "text", max_tokens: int | None = None) -> list[str]:
    """The texts at ``path``; with ``max_tokens``, only as much of them as that many tokens can need."""
    limit = max_tokens * CHARS_PER_TOKEN if max_tokens else None
    texts = _texts(Path(path), field, [limit])  # the budget left, shared by a folder's files, stops the reading
    if limit is not None:  # and cuts what was read: a single record may be longer than the budget
        texts = [t[:limit - before] for t, before in zip(texts, _running_total(texts)) if before < limit]
    if not any(t.strip() for t in texts):
        raise WeightsmithError(f"{path}: data file is empty")
    return texts


def _texts(path: Path, field: str, budget: list) -> list[str]:
    if path.is_dir():
        files = sorted(p for p in path.rglob("*") if p.is_file() and p.suffix in (".txt", ".md", ".jsonl"))
        if not files:
            raise WeightsmithError(f"{path}: folder holds no .txt, .md or .jsonl files")
        return [t for f in files if budget[0] is None or budget[0] > 0 for t in _texts(f, field, budget)]
    if not path.is_file():
        raise WeightsmithError(f"{path}: data file not found")
    if path.suffix in (".jsonl", ".csv"):
        rows = _jsonl(path, (field,), budget) if path.suffix == ".jsonl" else _csv(path, (field,), budget)
        return [str(r[field]) for r in rows]
    with open(path, encoding="utf-8", errors="replace") as f:
        text = f.read(-1 if budget[0] is None else budget[0])
    if budget[0] is not None:
        budget[0] -= len(text)
    return [text]


def _running_total(texts: list[str]) -> list[int]:
    """The characters before each text."""
    totals, n = [], 0
    for t in texts:
        totals.append(n)
        n += len(t)
    return totals


def _spend(budget: list, text: str) -> bool:
    """Take ``text`` from the budget; False once nothing is left."""
    if budget[0] is None:
        return True
    budget[0] -= len(text)
    return budget[0] > 0


def check_data_file(path: str | Path, labelled: bool = False, max_tokens: int | None = None) -> None:
    """Read ``path`` as far as a stage reads it (texts up to ``max_tokens``; every labelled row), refusing what
    that reading refuses, so a check made before any stage computes finds it."""
    path = Path(path)
    if not labelled:
        load_texts(path, max_tokens=max_tokens)
    elif path.suffix in (".jsonl", ".csv") and path.is_file():
        (_jsonl if path.suffix == ".jsonl" else _csv)(path, ())
    else:
        load_labelled(path)


def load_labelled(path: str | Path, text_field: str = "text", label_field: str = "label") -> tuple[list[str], list]:
    """(inputs, labels) from a jsonl or CSV with an input column (``text_field``) and a label column."""
    path = Path(path)
    if path.suffix == ".jsonl":
        rows = _jsonl(path, (text_field, label_field))
    elif path.suffix == ".csv":
        rows = _csv(path, (text_field, label_field))
    else:
        raise WeightsmithError(f"{path}: labelled data must be .jsonl or .csv with '{text_field}' and '{label_field}'")
    return [str(r[text_field]) for r in rows], [r[label_field] for r in rows]


def load_labelled_images(path: str | Path) -> tuple[list[Path], list]:
    """(image files, labels) from a jsonl or CSV with 'image' (a path, relative to the data file) and 'label'."""
    path = Path(path)
    files, labels = load_labelled(path, text_field="image")
    images = [(path.parent / f) for f in files]
    missing = next((f for f in images if not f.is_file()), None)
    if missing is not None:
        raise WeightsmithError(f"{path}: image {missing} not found")
    return images, labels


def _jsonl(path: Path, need: tuple[str, ...], budget: list | None = None) -> list[dict]:
    rows = []
    for n, line in _data_file(path):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as exc:
            raise WeightsmithError(f"{path}:{n}: not valid JSON ({exc.msg})") from None
        except RecursionError:
            raise WeightsmithError(f"{path}:{n}: JSON nested too deeply to be a record") from None
        missing = [k for k in need if not isinstance(row, dict) or k not in row]
        if missing:
            raise WeightsmithError(f"{path}:{n}: record has no {missing[0]!r} field")
        rows.append(row)
        if not _spend(budget or [None], line):
            break
    if not rows:
        raise WeightsmithError(f"{path}: no records")
    return rows


def _csv(path: Path, need: tuple[str, ...], budget: list | None = None) -> list[dict]:
    rows = []
    reader = csv.DictReader(line for _, line in _data_file(path))
    try:
        missing = [k for k in need if k not in (reader.fieldnames or [])]
        if missing:
            raise WeightsmithError(f"{path}: CSV has no {missing[0]!r} column (columns: {reader.fieldnames})")
        for row in reader:
            rows.append(row)
            if not _spend(budget or [None], "".join(str(v) for v in row.values())):
                break
    except csv.Error as exc:
        raise WeightsmithError(f"{path}:{reader.line_num}: not valid CSV ({exc})") from None
    if not rows:
        raise WeightsmithError(f"{path}: no rows")
    return rows


def _data_file(path: Path):
    """(line number, line) of a UTF-8 data file, read a line at a time; a line that is not UTF-8 is one error."""
    with open(path, "rb") as f:
        for n, raw in enumerate(f, 1):
            try:
                yield n, raw.decode("utf-8")
            except UnicodeDecodeError:
                raise WeightsmithError(f"{path}:{n}: not UTF-8 text; save the data as UTF-8") from None


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
