"""The loading gate: what every stage passes before it touches a model folder's tensors or code.

``open_model`` validates the whole folder (every file it names stays inside it and is a regular file,
every safetensors header checked, no tensor stored twice) and refuses a folder that asks transformers
to run its own Python (``auto_map``) unless remote code was allowed, by argument or for a whole command
with ``remote_code(True)`` (the CLI's ``--trust-remote-code``). Nothing here prompts or reads stdin.
"""
from __future__ import annotations

from contextlib import contextmanager
from contextvars import ContextVar
from pathlib import Path

from ..errors import needs_option
from .files import read_json
from .reader import Checkpoint, check_side_files

# Files in which transformers looks for ``auto_map`` (custom classes imported from the folder's .py files).
CODE_CONFIGS = ("config.json", "tokenizer_config.json", "preprocessor_config.json", "processor_config.json",
                "feature_extractor_config.json", "image_processor_config.json")

_ALLOWED: ContextVar[bool] = ContextVar("weightsmith_trust_remote_code", default=False)


@contextmanager
def remote_code(allowed: bool):
    """Within the block, loading may run a folder's own code (``--trust-remote-code``); outside, never."""
    token = _ALLOWED.set(bool(allowed))
    try:
        yield
    finally:
        _ALLOWED.reset(token)


def remote_code_allowed(explicit: bool | None = None) -> bool:
    return _ALLOWED.get() if explicit is None else bool(explicit)


def custom_code(folder: str | Path) -> str | None:
    """Where ``folder`` asks for its own code (``file: auto_map names X``), or None."""
    folder = Path(folder)
    for name in CODE_CONFIGS:
        file = folder / name
        if not file.is_file():
            continue
        auto_map = read_json(file, name).get("auto_map")
        if auto_map:
            first = next(iter(auto_map.values()), auto_map) if isinstance(auto_map, dict) else auto_map
            return f"{file}: auto_map names custom code ({first})"
    return None


def check_code(folder: str | Path, trust_remote_code: bool | None = None) -> bool:
    """Refuse custom code unless allowed. Returns whether the folder has (allowed) custom code."""
    check_side_files(Path(folder))
    reason = custom_code(folder)
    if reason and not remote_code_allowed(trust_remote_code):
        raise needs_option(f"{reason} that loading would run", "; set {0} only if you trust this folder's Python "
                                                               "files", "trust_remote_code")
    return reason is not None


def open_model(path: str | Path, allow_pickle: bool = False, trust_remote_code: bool | None = None) -> Checkpoint:
    """The validated checkpoint of a model folder that a stage may load (see the module docstring)."""
    check_code(path, trust_remote_code)  # before Checkpoint: with --allow-pickle it unpickles
    return Checkpoint(path, allow_pickle=allow_pickle)
