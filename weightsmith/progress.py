"""Progress reporting without printing: stages call a callback, the CLI renders it as rich bars.

A callback is ``progress(label, done, total)``; ``total`` may be None when unknown.
"""
from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator
from typing import TypeVar

ProgressFn = Callable[[str, int, "int | None"], None]
T = TypeVar("T")


def track(progress: ProgressFn | None, label: str, items: Iterable[T], total: int | None = None) -> Iterator[T]:
    """Yield ``items`` and report each one to ``progress`` under ``label``."""
    if total is None and hasattr(items, "__len__"):
        total = len(items)  # type: ignore[arg-type]
    if progress is not None:
        progress(label, 0, total)
    for i, item in enumerate(items, 1):
        yield item
        if progress is not None:
            progress(label, i, total)


def report(progress: ProgressFn | None, label: str, done: int, total: int | None) -> None:
    if progress is not None:
        progress(label, done, total)
