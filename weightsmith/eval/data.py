"""Evaluation data: plain text (file or folder), jsonl with a ``text`` field, labelled jsonl/CSV."""
from __future__ import annotations

import csv
import json
from pathlib import Path

from ..errors import WeightsmithError


def load_texts(path: str | Path, field: str = "text") -> list[str]:
    path = Path(path)
    if path.is_dir():
        files = sorted(p for p in path.rglob("*") if p.is_file() and p.suffix in (".txt", ".md", ".jsonl"))
        if not files:
            raise WeightsmithError(f"{path}: folder holds no .txt, .md or .jsonl files")
        return [t for f in files for t in load_texts(f, field)]
    if not path.is_file():
        raise WeightsmithError(f"{path}: data file not found")
    if path.suffix == ".jsonl":
        return [str(r[field]) for r in _jsonl(path, (field,))]
    if path.suffix == ".csv":
        return [r[field] for r in _csv(path, (field,))]
    text = path.read_text(encoding="utf-8", errors="replace")
    if not text.strip():
        raise WeightsmithError(f"{path}: data file is empty")
    return [text]


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


def _jsonl(path: Path, need: tuple[str, ...]) -> list[dict]:
    rows = []
    with open(path, encoding="utf-8") as f:
        for n, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as exc:
                raise WeightsmithError(f"{path}:{n}: not valid JSON ({exc.msg})") from exc
            missing = [k for k in need if not isinstance(row, dict) or k not in row]
            if missing:
                raise WeightsmithError(f"{path}:{n}: record has no {missing[0]!r} field")
            rows.append(row)
    if not rows:
        raise WeightsmithError(f"{path}: no records")
    return rows


def _csv(path: Path, need: tuple[str, ...]) -> list[dict]:
    with open(path, encoding="utf-8", newline="") as f:
        reader = csv.DictReader(f)
        missing = [k for k in need if k not in (reader.fieldnames or [])]
        if missing:
            raise WeightsmithError(f"{path}: CSV has no {missing[0]!r} column (columns: {reader.fieldnames})")
        rows = list(reader)
    if not rows:
        raise WeightsmithError(f"{path}: no rows")
    return rows
