"""The Hub's network, as every command that uses it sees it: the offline default lifted for the call, and
every request of huggingface_hub's client given a connect timeout, a read timeout and a whole-request deadline.

Only ``push`` and Hub model references (``org/name[@rev]``) reach the network; every other use of
huggingface_hub inside weightsmith stays offline (the CLI sets ``HF_HUB_OFFLINE=1`` unless the user chose).
"""
from __future__ import annotations

import os
import threading
import time
from contextlib import contextmanager

from ..errors import needs_option

OFFLINE_BY_DEFAULT = "WEIGHTSMITH_OFFLINE_BY_DEFAULT"
TRUE = ("1", "true", "yes", "on")


def user_offline() -> bool:
    """Whether the user asked for no network (``HF_HUB_OFFLINE``, or ``--offline``), as opposed to weightsmith's
    own default for the libraries it calls."""
    return os.environ.get("HF_HUB_OFFLINE", "0").lower() in TRUE and os.environ.get(OFFLINE_BY_DEFAULT) != "1"


def endpoint() -> str:
    from huggingface_hub import constants

    return (os.environ.get("HF_ENDPOINT") or constants.ENDPOINT).rstrip("/")


DEFAULT_TIMEOUT = 60.0  # seconds: connecting, and waiting for each answer (or for the server to take data)
# A request may last its timeout plus one second per MIN_RATE bytes it moves: a server that drips its answer
# cannot hold a command past that, while a large upload or download at any usable speed is never cut.
MIN_RATE = 64 * 1024


@contextmanager
def online(timeout: float = DEFAULT_TIMEOUT):
    """Lift weightsmith's offline default for the block, and give every request of huggingface_hub's shared HTTP
    client a connect and read timeout (it has none)."""
    from huggingface_hub import constants

    if user_offline():
        raise needs_option("HF_HUB_OFFLINE is set", " (or {0} given); the Hub cannot be reached", "offline")
    saved = constants.HF_HUB_OFFLINE
    constants.HF_HUB_OFFLINE = False
    restore = _set_timeouts(timeout)
    try:
        yield
    finally:
        constants.HF_HUB_OFFLINE = saved
        restore()


def _set_timeouts(timeout: float):
    """Make huggingface_hub's shared client (httpx, huggingface_hub >= 1.0) time out; returns the undo."""
    try:
        from huggingface_hub.utils import _http
        factory = _http._GLOBAL_CLIENT_FACTORY
        set_factory = _http.set_client_factory
    except (ImportError, AttributeError):  # huggingface_hub < 1.0 (requests): its calls carry their own timeouts
        return lambda: None

    def with_timeouts():
        client = factory()
        client.timeout = type(client.timeout)(timeout, connect=min(timeout, 10.0))
        _with_deadline(client, timeout)
        return client

    set_factory(with_timeouts)
    return lambda: set_factory(factory)


class _Request(threading.local):
    """The request this thread is making: when it began, its allowance, the bytes it has moved."""
    start = 0.0
    allowed = DEFAULT_TIMEOUT
    moved = 0


_request = _Request()


def _with_deadline(client, timeout: float) -> None:
    """Give every connection of ``client`` a stream that refuses to wait past its request's deadline (httpx's
    own timeouts are per read, so a server sending a byte now and then would never trip them)."""
    core = __import__(type(client).__module__.split(".")[0].replace("httpx", "httpcore"))

    def begin(request) -> None:
        _request.start, _request.allowed, _request.moved = time.monotonic(), timeout, 0

    client.event_hooks["request"] = [*client.event_hooks["request"], begin]
    # httpx has no public hook for its connections: a client without these attributes keeps per-read timeouts only
    for transport in [getattr(client, "_transport", None), *getattr(client, "_mounts", {}).values()]:
        pool = getattr(transport, "_pool", None)
        if pool is not None and hasattr(pool, "_network_backend"):
            pool._network_backend = _DeadlineBackend(pool._network_backend, core)


def _left(timeout: float | None, error) -> float:
    left = _request.start + _request.allowed + _request.moved / MIN_RATE - time.monotonic()
    if left <= 0:
        raise error(f"the request did not finish within {_request.allowed:g} s")
    return left if timeout is None else min(timeout, left)


class _DeadlineStream:
    def __init__(self, inner, core):
        self.inner, self.core = inner, core

    def read(self, max_bytes: int, timeout: float | None = None) -> bytes:
        data = self.inner.read(max_bytes, _left(timeout, self.core.ReadTimeout))
        _request.moved += len(data)
        return data

    def write(self, buffer: bytes, timeout: float | None = None) -> None:
        self.inner.write(buffer, _left(timeout, self.core.WriteTimeout))
        _request.moved += len(buffer)

    def start_tls(self, *args, **kwargs):
        return _DeadlineStream(self.inner.start_tls(*args, **kwargs), self.core)

    def close(self) -> None:
        self.inner.close()

    def get_extra_info(self, info: str):
        return self.inner.get_extra_info(info)


class _DeadlineBackend:
    def __init__(self, inner, core):
        self.inner, self.core = inner, core

    def connect_tcp(self, *args, **kwargs):
        return _DeadlineStream(self.inner.connect_tcp(*args, **kwargs), self.core)

    def connect_unix_socket(self, *args, **kwargs):
        return _DeadlineStream(self.inner.connect_unix_socket(*args, **kwargs), self.core)

    def sleep(self, seconds: float) -> None:
        self.inner.sleep(seconds)


def is_timeout(exc: BaseException) -> bool:
    return isinstance(exc, TimeoutError) or any(k.__name__ in ("TimeoutException", "Timeout", "ReadTimeout")
                                                for k in type(exc).__mro__)


def transport_errors() -> tuple[type[BaseException], ...]:
    """What the Hub client raises when the exchange itself fails (unreachable, too slow, redirected in a loop,
    not decodable): requests' errors are OSErrors (huggingface_hub < 1.0), httpx's are RequestErrors."""
    errors: tuple[type[BaseException], ...] = (OSError,)
    for module in ("httpx2", "httpx"):
        try:
            errors += (__import__(module).RequestError,)
        except (ImportError, AttributeError):
            pass
    return errors


def http_hint(status: int | None, *, write: bool) -> str:
    """The fix for an HTTP error from the Hub: one table for downloads (``write`` False) and pushes."""
    if status == 401:
        return "set HF_TOKEN or run `hf auth login`"
    if status == 403:
        return "the token lacks write access to this repo" if write else "the token may not read this repo"
    return "check the repo id and your access" if write else "try again later"
