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


def return_freed_memory(threshold: int = 1 << 20) -> None:
    """Blocks of ``threshold`` bytes or more (tensors) get their own memory mapping, given back to the system as
    soon as they are freed.

    glibc raises its threshold each time such a block is freed, up to 32 MiB; past that, a forward pass's
    activations come from the heap and stay in the process's resident memory after they are freed."""
    import ctypes
    import sys

    if not sys.platform.startswith("linux"):
        return
    try:
        mallopt = ctypes.CDLL("libc.so.6").mallopt
    except (OSError, AttributeError):  # not glibc
        return
    m_mmap_threshold = -3
    mallopt(m_mmap_threshold, threshold)
