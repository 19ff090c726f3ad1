"""Real English prose that ships with Python (the language reference topics in ``pydoc_data.topics``),
split by topic into a calibration part and a held-out part, for measuring folds of sentence encoders
on text the calibration never saw.

Sentences are the prose of each topic (code lines and reStructuredText markup left out), 8 to 40 words.
Topics are sorted by name; even positions are calibration, odd positions are held out. A third split,
``docstrings``, is more calibration text: the sentences of the docstrings of the standard library's
top-level modules (their modules, classes and functions), in file order, none of them a held-out sentence.
A fourth, ``packages``, is the same for the modules inside the standard library's packages (their test suites
and ``site-packages`` left out), none of them a held-out or a ``docstrings`` sentence: about twice as many.
"""
from __future__ import annotations

import ast
import functools
import re
import sysconfig
from pathlib import Path

SPLITS = ("calib", "heldout", "docstrings", "packages")
NOT_PACKAGES = {"site-packages", "test", "tests", "idle_test"}


def _sentences(text: str) -> list[str]:
    out = []
    for para in re.split(r"\n\s*\n", text):
        lines = [ln.strip() for ln in para.splitlines()]
        if not lines or any(ln.startswith((">>>", "...")) for ln in lines) or para.startswith((" " * 3, "\t")):
            continue
        flat = " ".join(lines)
        if set(flat) <= set("*=-~^ "):
            continue
        for s in re.split(r"(?<=[.!?])\s+(?=[A-Z])", flat):
            s = s.replace('"', "").replace("*", "").strip()
            words = s.split()
            letters = sum(c.isalpha() for c in s)
            if 8 <= len(words) <= 40 and letters > 0.7 * len(s.replace(" ", "")) and s.endswith("."):
                out.append(s)
    return out


def english_sentences(split: str) -> list[str]:
    """Unique sentences of one split, in topic order; no held-out sentence is also a calibration one."""
    if split not in SPLITS:
        raise ValueError(f"split {split!r} is not one of {SPLITS}")
    return list(_split(split, _stdlib()))


@functools.lru_cache(maxsize=None)
def _split(split: str, stdlib: Path) -> tuple[str, ...]:
    """One split's sentences, read once per standard-library folder."""
    if split == "docstrings":
        return _docstring_sentences(sorted(stdlib.glob("*.py")), set(english_sentences("heldout")))
    if split == "packages":
        files = [f for f in sorted(stdlib.glob("*/**/*.py")) if not NOT_PACKAGES & set(f.relative_to(stdlib).parts)]
        return _docstring_sentences(files, set(english_sentences("heldout")) | set(english_sentences("docstrings")))
    from pydoc_data.topics import topics

    names = sorted(topics)[SPLITS.index(split)::2]
    seen, out = set(english_sentences("calib")) if split == "heldout" else set(), []
    for name in names:
        for s in _sentences(topics[name]):
            if s not in seen:
                seen.add(s)
                out.append(s)
    return tuple(out)


def _stdlib() -> Path:
    return Path(sysconfig.get_paths()["stdlib"])


def _docstring_sentences(files: list[Path], exclude: set[str]) -> tuple[str, ...]:
    out, seen = [], set(exclude)
    for file in files:
        try:
            tree = ast.parse(file.read_text(encoding="utf-8"))
        except (SyntaxError, UnicodeDecodeError, ValueError):
            continue
        for node in ast.walk(tree):
            if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
                for s in _sentences(ast.get_docstring(node) or ""):
                    if s not in seen:
                        seen.add(s)
                        out.append(s)
    return tuple(out)


def write_calibration(path: str | Path, max_sentences: int | None = None, docstrings: bool = False,
                      packages: bool = False) -> Path:
    """The calibration sentences (then, with ``docstrings``, the docstring sentences, and with ``packages`` those
    of the packages' modules), one per line, in a text file at ``path``."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    lines = english_sentences("calib")[:max_sentences] + (english_sentences("docstrings") if docstrings else []) \
        + (english_sentences("packages") if packages else [])
    path.write_text("\n".join(lines) + "\n")
    return path
