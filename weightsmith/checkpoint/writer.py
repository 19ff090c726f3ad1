"""Atomic, streaming output folders.

``output_folder`` hands out a temporary directory beside the target and renames it into place
only when the stage succeeds, so an interrupted run never leaves a folder that looks finished.
``ShardedWriter`` lays out shards from a plan (names, dtypes, shapes) and writes each tensor
straight to its place on disk: no shard is ever buffered in memory.
"""
from __future__ import annotations

import json
import re
import shutil
import uuid
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path

import torch

from ..errors import WeightsmithError
from .reader import INDEX_NAME, SINGLE_NAME, SIDE_FILES
from .safetensors_file import ShardFile

DEFAULT_SHARD_SIZE = 5 * 10**9
_UNITS = {"": 1, "B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12,
          "KIB": 2**10, "MIB": 2**20, "GIB": 2**30, "TIB": 2**40}


def parse_size(text: str | int) -> int:
    """'2GB' -> 2e9, '300MiB' -> 300*2**20, 1000 -> 1000."""
    if isinstance(text, int):
        return text
    m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([A-Za-z]*)\s*", str(text))
    if not m or m.group(2).upper() not in _UNITS:
        raise WeightsmithError(f"size {text!r} not understood; write e.g. 5GB, 300MB, 2GiB or a byte count")
    n = int(float(m.group(1)) * _UNITS[m.group(2).upper()])
    if n <= 0:
        raise WeightsmithError(f"size {text!r} must be positive")
    return n


def _inside(a: Path, b: Path) -> bool:
    """True when a == b or a lies inside b."""
    a, b = a.resolve(), b.resolve()
    return a == b or b in a.parents


def check_output(target: str | Path, inputs: Iterable[str | Path] = (), force: bool = False) -> Path:
    """Refuse an output that would overwrite or sit inside an input, or exist without --force."""
    target = Path(target)
    for inp in inputs:
        inp = Path(inp)
        if _inside(target, inp):
            raise WeightsmithError(f"output {target} is inside input {inp}; choose a folder outside every input")
        if force and _inside(inp, target):
            raise WeightsmithError(f"--force would delete {target}, which holds input {inp}")
    if target.exists() and not force:
        raise WeightsmithError(f"{target} already exists; pass --force to replace it")
    if target.exists() and not target.is_dir():
        raise WeightsmithError(f"{target} exists and is not a folder")
    return target


@contextmanager
def output_folder(target: str | Path, inputs: Iterable[str | Path] = (), force: bool = False) -> Iterator[Path]:
    """Yield a temp folder ``TARGET.tmp-*``; on success it replaces ``target`` atomically."""
    target = check_output(target, list(inputs), force)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.parent / f"{target.name}.tmp-{uuid.uuid4().hex[:8]}"
    tmp.mkdir()
    try:
        yield tmp
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    old = None
    if target.exists():
        old = target.parent / f"{target.name}.old-{uuid.uuid4().hex[:8]}"
        target.rename(old)
    tmp.rename(target)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def shard_plan(entries: list[tuple[str, torch.dtype, tuple[int, ...]]], max_shard_size: int) -> list[list[tuple]]:
    """Split entries, in order, into shards of at most ``max_shard_size`` bytes (a lone big tensor gets its own)."""
    shards: list[list[tuple]] = [[]]
    size = 0
    for entry in entries:
        n = torch.Size(entry[2]).numel() * torch.empty((), dtype=entry[1]).element_size()
        if shards[-1] and size + n > max_shard_size:
            shards.append([])
            size = 0
        shards[-1].append(entry)
        size += n
    return shards


class ShardedWriter:
    """Write the planned tensors into ``folder`` as HF-style shards (+ index when more than one)."""

    def __init__(self, folder: Path, plan: list[tuple[str, torch.dtype, tuple[int, ...]]],
                 max_shard_size: int | str = DEFAULT_SHARD_SIZE, metadata: dict[str, str] | None = None):
        self.folder = Path(folder)
        names = [p[0] for p in plan]
        if len(set(names)) != len(names):
            dup = next(n for n in names if names.count(n) > 1)
            raise WeightsmithError(f"output plan names tensor {dup!r} twice")
        groups = shard_plan(plan, parse_size(max_shard_size))
        n = len(groups)
        self.file_names = [SINGLE_NAME] if n == 1 else [f"model-{i + 1:05d}-of-{n:05d}.safetensors" for i in range(n)]
        self.shards: list[ShardFile] = []
        self.where: dict[str, ShardFile] = {}
        self.total_size = 0
        for fname, group in zip(self.file_names, groups):
            shard = ShardFile(self.folder / fname, group, metadata)
            self.shards.append(shard)
            self.total_size += shard.size - shard.data_start
            for entry in group:
                self.where[entry[0]] = shard

    def write(self, name: str, tensor: torch.Tensor) -> None:
        try:
            shard = self.where[name]
        except KeyError:
            raise WeightsmithError(f"tensor {name!r} is not in the output plan") from None
        shard.write(name, tensor)

    def close(self) -> None:
        for shard in self.shards:
            shard.close()
        missing = [n for s in self.shards for n in s.pending]
        if missing:
            raise WeightsmithError(f"output incomplete: tensor {missing[0]!r} and {len(missing) - 1} more never written")
        if len(self.shards) > 1:
            index = {"metadata": {"total_size": self.total_size},
                     "weight_map": {name: shard.path.name for name, shard in self.where.items()}}
            (self.folder / INDEX_NAME).write_text(json.dumps(index, indent=2) + "\n")


def save_state_dict(state: dict[str, torch.Tensor], folder: Path, max_shard_size: int | str = DEFAULT_SHARD_SIZE,
                    metadata: dict[str, str] | None = None) -> None:
    """Write a whole in-memory state dict (for stages whose result is a small model)."""
    writer = ShardedWriter(folder, [(k, v.dtype, tuple(v.shape)) for k, v in state.items()], max_shard_size, metadata)
    for k, v in state.items():
        writer.write(k, v)
    writer.close()


def write_config(folder: Path, config: dict) -> None:
    (Path(folder) / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")


def copy_side_files(src: str | Path, folder: Path) -> list[str]:
    """Copy tokenizer / generation files (not config.json, not weights) from ``src``."""
    copied = []
    for name in SIDE_FILES:
        p = Path(src) / name
        if p.is_file():
            shutil.copy2(p, Path(folder) / name)
            copied.append(name)
    return copied
