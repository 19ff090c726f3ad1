"""A model folder's files as the loading gate reads them: a named file only if it stays inside the folder (or in
its own Hugging Face cache repo's blobs/) and is regular; JSON read from such a file, with one-line errors."""
from __future__ import annotations

import json
import os
import stat
from pathlib import Path, PurePosixPath

from ..errors import WeightsmithError
from .safetensors_file import NOT_REGULAR, no_duplicates, open_regular


def read_json(path: Path, what: str) -> dict:
    try:
        data = json.loads(read_regular(path), object_pairs_hook=no_duplicates)
    except WeightsmithError as exc:
        raise WeightsmithError(f"{path}: {what} {exc}") from None
    except FileNotFoundError:
        raise WeightsmithError(f"{path}: no {what} found") from None
    except RecursionError:
        raise WeightsmithError(f"{path}: {what} nests JSON too deeply to be a real {what}") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise WeightsmithError(f"{path}: {what} is not valid JSON ({exc})") from None
    if not isinstance(data, dict):
        raise WeightsmithError(f"{path}: {what} must be a JSON object")
    return data


def read_regular(path: Path, limit: int = -1) -> bytes:
    """The bytes of the regular file ``path`` (at most ``limit`` of them)."""
    with os.fdopen(open_regular(path), "rb") as f:
        return f.read(limit)


def member(folder: Path, name: object, where: Path | str) -> Path:
    """``folder / name`` for a file name read from ``where``, refused unless it stays inside ``folder``
    (no absolute path, no ``..``, no symlink leading out) and, if it exists, is a regular file."""
    if not isinstance(name, str) or not name or "\0" in name:
        raise WeightsmithError(f"{where}: file name {name!r} is not a file name")
    rel = PurePosixPath(name)
    if rel.is_absolute() or ".." in rel.parts or "\\" in name:
        raise WeightsmithError(f"{where}: names {name!r}, outside the model folder; every file it names must be "
                               f"inside {folder}")
    path = folder / name
    if not os.path.lexists(path):
        return path
    try:
        real = path.resolve(strict=True)
    except FileNotFoundError:
        raise WeightsmithError(f"{path}: a symlink to nothing; replace it with the file it should hold") from None
    except (OSError, RuntimeError) as exc:
        raise WeightsmithError(f"{path}: cannot be resolved ({exc})") from None
    if not real.is_relative_to(folder.resolve()) and real.parent != cache_blobs(folder):
        raise WeightsmithError(f"{path}: a symlink to {real}, outside the model folder; weightsmith reads only files "
                               "inside the folder, or in its own repo's blobs/ for a Hugging Face cache snapshot "
                               "(copy the file in, e.g. cp -L)")
    if not stat.S_ISREG(os.stat(real).st_mode):
        raise WeightsmithError(f"{path}: {NOT_REGULAR}")
    return path


def cache_blobs(folder: Path) -> Path | None:
    """The ``blobs/`` folder of the Hugging Face cache repo whose snapshot ``folder`` is
    (``models--ORG--NAME/snapshots/REV``), resolved, or None when ``folder`` is not a cache snapshot. A
    snapshot's files are symlinks into exactly that folder; a link anywhere else is still refused."""
    try:
        snapshot = folder.resolve(strict=True)
    except (OSError, RuntimeError):
        return None
    repo = snapshot.parent.parent
    if snapshot.parent.name != "snapshots" or not repo.name.startswith("models--"):
        return None
    blobs = repo / "blobs"
    return blobs if blobs.is_dir() and not blobs.is_symlink() else None
