"""What the package and the CLI do while they import."""
from __future__ import annotations

import gc
from collections.abc import Iterator
from contextlib import contextmanager


@contextmanager
def without_collections() -> Iterator[None]:
    """No garbage collection inside the block; the collector's state before it comes back after it.

    Importing torch creates about a million objects: a collection every few thousand of them finds nothing
    to free and costs a tenth of the start-up."""
    collecting = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if collecting:
            gc.enable()
