"""Evaluation data: plain text (file or folder), jsonl with a ``text`` field, labelled jsonl/CSV."""
from __future__ import annotations

import csv
import json
from pathlib import Path

from ..errors import WeightsmithError


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
