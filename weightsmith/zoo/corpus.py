"""The zoo's training text, pinned: slices of CPython 3.11.7's standard library and pydoc's English topics,
shipped in ``corpus.json.xz`` beside this file so that every Python version trains the same zoo.

Domains are disjoint slices of that text; every tenth document went to the held-out split. The file holds,
per domain and split, the documents joined by ``SEPARATOR`` and cut to the most characters any zoo size
reads (``build.SIZES``); its sha256 is checked before use. ``freeze`` rebuilt it from the running
Python (kept to show where the text came from; a different Python gives a different file and hash).
"""
from __future__ import annotations

import hashlib
import json
import lzma
from functools import cache
from pathlib import Path

from ..errors import WeightsmithError

GENERAL = "general"
DOMAINS = {
    # name: stdlib globs the text was cut from (prose came from pydoc_data instead)
    "prose": (),
    "asyncio": ("asyncio/*.py", "concurrent/**/*.py"),
    "email": ("email/**/*.py", "http/*.py", "urllib/*.py"),
    GENERAL: ("*.py", "json/*.py", "xml/**/*.py"),
}
SEPARATOR = "\n<|endoftext|>\n"
PINNED = Path(__file__).with_name("corpus.json.xz")
PINNED_SHA256 = "1727f89d791cca0aeeab0f2fac311fa94d59228c40f89c8f809658c0e93b1f86"


@cache
def _pinned() -> dict:
    try:
        blob = PINNED.read_bytes()
    except OSError as exc:
        raise WeightsmithError(f"{PINNED}: the zoo corpus is missing ({exc.strerror}); reinstall weightsmith") from None
    digest = hashlib.sha256(blob).hexdigest()
    if digest != PINNED_SHA256:
        raise WeightsmithError(f"{PINNED}: sha256 {digest[:12]}... is not the pinned {PINNED_SHA256[:12]}...; "
                               "the zoo corpus was changed, reinstall weightsmith")
    return json.loads(lzma.decompress(blob).decode("utf-8"))


def split_text(domain: str, split: str, max_chars: int | None = None) -> str:
    """Concatenated documents of ``split`` ('train' or 'valid'), cut to ``max_chars``."""
    entry = _pinned()["domains"][domain][split]
    text = entry["text"]
    if not entry["complete"] and (max_chars is None or max_chars > len(text)):
        raise WeightsmithError(f"zoo corpus: {domain}.{split} is pinned to its first {len(text)} characters; "
                               f"{max_chars or 'all'} asked for")
    return text[:max_chars] if max_chars else text


def corpus_digest() -> str:
    """The digest of the stdlib documents the text was cut from (names and full texts): it keys the zoo cache,
    so a zoo built from the same text before the corpus was pinned keeps its key."""
    return _pinned()["digest"]


# -- how the pinned file was made ----------------------------------------------------------------

def _stdlib_documents(domain: str) -> list[tuple[str, str]]:
    import sysconfig

    if domain == "prose":
        from pydoc_data.topics import topics
        return [(k, topics[k]) for k in sorted(topics)]
    root = Path(sysconfig.get_paths()["stdlib"])
    files = sorted({p for g in DOMAINS[domain] for p in root.glob(g) if p.is_file()})
    return [(str(p.relative_to(root)), p.read_text(encoding="utf-8", errors="replace")) for p in files]


def freeze(out: Path, caps: dict[str, int]) -> str:
    """Write the pinned corpus from the running Python's standard library; ``caps``: {'train': n, 'valid': n}.

    Returns the file's sha256 (to go in PINNED_SHA256)."""
    import sys

    h = hashlib.sha256()
    domains = {}
    for d in DOMAINS:
        docs = _stdlib_documents(d)
        for name, text in docs:
            h.update(name.encode())
            h.update(hashlib.sha256(text.encode()).digest())
        domains[d] = {}
        for split, cap in caps.items():
            text = SEPARATOR.join(t for i, (_, t) in enumerate(docs) if (i % 10 == 9) == (split == "valid"))
            domains[d][split] = {"text": text[:cap], "complete": len(text) <= cap}
    doc = {"source": f"Python {sys.version.split()[0]} standard library and pydoc_data topics",
           "digest": h.hexdigest()[:16], "domains": domains}
    blob = lzma.compress(json.dumps(doc, ensure_ascii=False, sort_keys=True).encode("utf-8"),
                         preset=9 | lzma.PRESET_EXTREME)
    Path(out).write_bytes(blob)
    return hashlib.sha256(blob).hexdigest()
