"""User-written text files (recipes, pipelines): read as UTF-8, any failure one clear line."""
from __future__ import annotations

from pathlib import Path

from ..errors import WeightsmithError


def read_text_file(path: str | Path, what: str) -> str:
    """The text of ``path``; ``what`` names the file in errors ('recipe', 'pipeline file')."""
    path = Path(path)
    try:
        return path.read_bytes().decode("utf-8")
    except UnicodeDecodeError as exc:
        raise WeightsmithError(f"{path}: not UTF-8 text (byte {exc.start}); save the {what} as UTF-8") from None
    except OSError as exc:
        raise WeightsmithError(f"{path}: cannot read the {what} ({exc.strerror})") from None
