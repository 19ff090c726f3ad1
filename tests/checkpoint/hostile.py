"""Hostile and corrupt model folders, and the command line run in this process (no interpreter start per case)."""
from __future__ import annotations

import json
import signal
import struct
import subprocess
import sys
from pathlib import Path

import torch

from weightsmith.checkpoint import Checkpoint, save_state_dict, write_config

INDEX = "model.safetensors.index.json"


# -- folders ---------------------------------------------------------------------------------------
def sharded_copy(src: Path, dst: Path, shard_size: str = "20KB") -> Path:
    """``src`` re-saved as several shards with an index (config and side files kept)."""
    ckpt = Checkpoint(src)
    dst.mkdir(parents=True)
    save_state_dict(ckpt.state_dict(), dst, shard_size)
    write_config(dst, ckpt.config)
    return dst


def index(folder: Path) -> dict:
    return json.loads((folder / INDEX).read_text())


def write_index(folder: Path, data: dict) -> None:
    (folder / INDEX).write_text(json.dumps(data))


def shards(folder: Path) -> list[str]:
    return sorted(set(index(folder)["weight_map"].values()))


def rename_shard(folder: Path, old: str, new: str) -> None:
    data = index(folder)
    data["weight_map"] = {k: (new if v == old else v) for k, v in data["weight_map"].items()}
    write_index(folder, data)


def split_file(path: Path) -> tuple[dict, bytes]:
    raw = path.read_bytes()
    (n,) = struct.unpack("<Q", raw[:8])
    return json.loads(raw[8:8 + n]), raw[8 + n:]


def write_raw(path: Path, header: bytes, data: bytes) -> None:
    path.write_bytes(struct.pack("<Q", len(header)) + header + data)


def edit_header(path: Path, fn) -> None:
    """Rewrite ``path``'s header as ``fn(header)`` returns it, the data bytes unchanged."""
    header, data = split_file(path)
    write_raw(path, json.dumps(fn(header)).encode(), data)


def first_tensor(header: dict) -> str:
    return next(k for k in header if k != "__metadata__")


def set_config(folder: Path, **changes) -> None:
    config = json.loads((folder / "config.json").read_text())
    config.update(changes)
    (folder / "config.json").write_text(json.dumps(config))


def resave(folder: Path, change) -> None:
    """Load ``folder``'s tensors, let ``change(state)`` edit them, and save them back (one file)."""
    ckpt = Checkpoint(folder)
    state = {k: v.clone() for k, v in ckpt.state_dict().items()}
    config = ckpt.config
    ckpt.close()
    for f in folder.glob("*.safetensors*"):
        f.unlink()
    change(state)
    save_state_dict(state, folder, "1GB")
    write_config(folder, config)


# -- running the command line in this process ------------------------------------------------------------
class _Blocked(Exception):
    pass


def _alarm(signum, frame):
    raise _Blocked("the command blocked for 120 s")


def cli(capsys, monkeypatch, *args) -> subprocess.CompletedProcess:
    """``weightsmith ARGS`` in this process, as the console script runs it (fast: no interpreter start).
    A command that blocks (e.g. on a FIFO) fails the test after 120 s instead of hanging it."""
    from weightsmith.cli import main

    capsys.readouterr()
    monkeypatch.setattr(sys, "argv", ["weightsmith", *map(str, args)])
    previous = signal.signal(signal.SIGALRM, _alarm)
    signal.alarm(120)
    try:
        main()
        code = 0
    except SystemExit as exc:
        code = exc.code if isinstance(exc.code, int) else 1
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, previous)
    captured = capsys.readouterr()
    return subprocess.CompletedProcess(args, code, captured.out, captured.err)


def nan_at(folder: Path, name: str, value: float = float("nan")) -> None:
    def change(state):
        state[name].view(-1)[0] = value
    resave(folder, change)


def to_dtype(folder: Path, name: str, dtype: torch.dtype) -> None:
    def change(state):
        state[name] = state[name].to(dtype)
    resave(folder, change)
