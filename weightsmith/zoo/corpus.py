"""Text that ships with Python itself: the standard library's source and pydoc's English topics.

Domains are disjoint slices of it; every tenth document goes to the held-out split.
"""
from __future__ import annotations

import hashlib
import sysconfig
from functools import cache
from pathlib import Path

GENERAL = "general"
DOMAINS = {
    # name: stdlib globs (prose comes from pydoc_data instead)
    "prose": (),
    "asyncio": ("asyncio/*.py", "concurrent/**/*.py"),
    "email": ("email/**/*.py", "http/*.py", "urllib/*.py"),
    GENERAL: ("*.py", "json/*.py", "xml/**/*.py"),
}
SEPARATOR = "\n<|endoftext|>\n"


def stdlib_dir() -> Path:
    return Path(sysconfig.get_paths()["stdlib"])


@cache
def documents(domain: str) -> tuple[tuple[str, str], ...]:
    """(name, text) pairs of one domain, in a fixed order."""
    if domain == "prose":
        from pydoc_data.topics import topics
        return tuple((k, topics[k]) for k in sorted(topics))
    root = stdlib_dir()
    files = sorted({p for g in DOMAINS[domain] for p in root.glob(g) if p.is_file()})
    return tuple((str(p.relative_to(root)), p.read_text(encoding="utf-8", errors="replace")) for p in files)


def split_text(domain: str, split: str, max_chars: int | None = None) -> str:
    """Concatenated documents of ``split`` ('train' or 'valid'), cut to ``max_chars``."""
    docs = documents(domain)
    chosen = [t for i, (_, t) in enumerate(docs) if (i % 10 == 9) == (split == "valid")]
    text = SEPARATOR.join(chosen)
    return text[:max_chars] if max_chars else text


def corpus_digest() -> str:
    h = hashlib.sha256()
    for d in DOMAINS:
        for name, text in documents(d):
            h.update(name.encode())
            h.update(hashlib.sha256(text.encode()).digest())
    return h.hexdigest()[:16]
