"""Folder formats weightsmith writes besides plain checkpoints: ``config["weightsmith"]["format"]`` -> the module
with ``load(path, device, dtype)``, ``export_plain(path, out, ...)`` and optionally ``describe(checkpoint)``.

The modules are imported by name when asked for, so this registry sits below every stage.
"""
from __future__ import annotations

import importlib
from pathlib import Path

from ..errors import WeightsmithError
from .files import member, read_json

FORMATS = {
    "folded": "weightsmith.fold.format",
    "rps": "weightsmith.compressor.format",
}


def folder_format(path: str | Path) -> str:
    config = read_json(member(Path(path), "config.json", path), "config.json")
    return (config.get("weightsmith") or {}).get("format", "plain")


def format_module(fmt: str):
    if fmt not in FORMATS:
        raise WeightsmithError(f"folder format {fmt!r} is unknown to this weightsmith version")
    return importlib.import_module(FORMATS[fmt])
