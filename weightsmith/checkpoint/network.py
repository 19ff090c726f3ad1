"""The Hub's network, as every command that uses it sees it: the offline default lifted for the call, and
every request of huggingface_hub's client given a connect and an answer timeout.

Only ``push`` and Hub model references (``org/name[@rev]``) reach the network; every other use of
huggingface_hub inside weightsmith stays offline (the CLI sets ``HF_HUB_OFFLINE=1`` unless the user chose).
"""
from __future__ import annotations

import os
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
        return client

    set_factory(with_timeouts)
    return lambda: set_factory(factory)


def is_timeout(exc: BaseException) -> bool:
    return isinstance(exc, TimeoutError) or any(k.__name__ in ("TimeoutException", "Timeout", "ReadTimeout")
                                                for k in type(exc).__mro__)


def transport_errors() -> tuple[type[BaseException], ...]:
    # huggingface_hub < 1.0 speaks through requests (its errors are OSErrors); later versions through httpx.
    errors: tuple[type[BaseException], ...] = (OSError,)
    for module in ("httpx2", "httpx"):
        try:
            errors += (__import__(module).TransportError,)
        except (ImportError, AttributeError):
            pass
    return errors


