"""safetensors headers read and checked by hand, and shards written tensor by tensor.

The header is parsed without touching tensor data so a folder is validated (sizes, offsets,
dtypes, overlaps) before any tensor is read. Writing lays out a shard from its plan first, so
each tensor's bytes can go straight to their offset as soon as they are computed.
"""
from __future__ import annotations

import json
import os
import struct
from dataclasses import dataclass
from pathlib import Path

import torch

from ..errors import WeightsmithError

ST_DTYPES: dict[str, tuple[torch.dtype, int]] = {
    "F64": (torch.float64, 8), "F32": (torch.float32, 4), "F16": (torch.float16, 2),
    "BF16": (torch.bfloat16, 2), "I64": (torch.int64, 8), "I32": (torch.int32, 4),
    "I16": (torch.int16, 2), "I8": (torch.int8, 1), "U8": (torch.uint8, 1), "BOOL": (torch.bool, 1),
    "F8_E4M3": (torch.float8_e4m3fn, 1), "F8_E5M2": (torch.float8_e5m2, 1),
    "U16": (torch.uint16, 2), "U32": (torch.uint32, 4), "U64": (torch.uint64, 8),
}
TORCH_TO_ST = {dt: name for name, (dt, _) in ST_DTYPES.items()}
MAX_HEADER = 100 * 1024 * 1024


@dataclass(frozen=True)
class TensorInfo:
    name: str
    dtype: str  # safetensors code, e.g. "F32"
    shape: tuple[int, ...]
    file: Path
    begin: int  # offset of the data from the end of the header
    end: int
    data_start: int = 0  # file offset where the data section (after the header) begins

    @property
    def nbytes(self) -> int:
        return self.end - self.begin

    @property
    def numel(self) -> int:
        n = 1
        for s in self.shape:
            n *= s
        return n

    @property
    def torch_dtype(self) -> torch.dtype:
        return ST_DTYPES[self.dtype][0]


def read_header(path: Path) -> tuple[dict[str, TensorInfo], dict[str, str]]:
    """Parse and validate one safetensors file's header. Returns (tensors, metadata)."""
    try:
        size = path.stat().st_size
        with open(path, "rb") as f:
            raw_len = f.read(8)
            if len(raw_len) < 8:
                raise WeightsmithError(f"{path}: truncated safetensors file ({size} bytes, no header); re-download or re-save it")
            (n,) = struct.unpack("<Q", raw_len)
            if n > MAX_HEADER or 8 + n > size:
                raise WeightsmithError(f"{path}: corrupt safetensors header (claims {n} header bytes in a {size}-byte file)")
            raw = f.read(n)
    except OSError as exc:
        raise WeightsmithError(f"{path}: cannot read ({exc.strerror})") from exc
    try:
        header = json.loads(raw)
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise WeightsmithError(f"{path}: corrupt safetensors header (not JSON: {exc})") from exc
    if not isinstance(header, dict):
        raise WeightsmithError(f"{path}: corrupt safetensors header (not a JSON object)")
    metadata = header.pop("__metadata__", None) or {}
    data_len = size - 8 - n
    tensors: dict[str, TensorInfo] = {}
    spans = []
    for name, entry in header.items():
        try:
            dtype, shape, (begin, end) = entry["dtype"], tuple(int(s) for s in entry["shape"]), entry["data_offsets"]
        except (KeyError, TypeError, ValueError) as exc:
            raise WeightsmithError(f"{path}: tensor {name!r} has a malformed header entry: {entry!r}") from exc
        if dtype not in ST_DTYPES:
            raise WeightsmithError(f"{path}: tensor {name!r} has unknown dtype {dtype!r}")
        info = TensorInfo(name, dtype, shape, path, int(begin), int(end), 8 + n)
        if not 0 <= info.begin <= info.end:
            raise WeightsmithError(f"{path}: tensor {name!r} has invalid offsets {begin}..{end}")
        if info.end > data_len:
            raise WeightsmithError(
                f"{path}: tensor {name!r} ends at byte {info.end} but the file holds {data_len} data bytes (truncated file)")
        if info.nbytes != info.numel * ST_DTYPES[dtype][1]:
            raise WeightsmithError(
                f"{path}: tensor {name!r} with shape {list(shape)} and dtype {dtype} needs "
                f"{info.numel * ST_DTYPES[dtype][1]} bytes but its offsets span {info.nbytes}")
        tensors[name] = info
        spans.append((info.begin, info.end, name))
    spans.sort()
    for (b0, e0, n0), (b1, e1, n1) in zip(spans, spans[1:]):
        if b1 < e0:
            raise WeightsmithError(f"{path}: tensors {n0!r} and {n1!r} overlap in the file (corrupt header)")
    return tensors, {str(k): str(v) for k, v in metadata.items()}


def _align8(n: int) -> int:
    return (n + 7) // 8 * 8


class ShardFile:
    """One safetensors file laid out up front: header first, then each tensor written at its offset."""

    def __init__(self, path: Path, entries: list[tuple[str, torch.dtype, tuple[int, ...]]], metadata: dict[str, str] | None = None):
        self.path = path
        header: dict[str, object] = {"__metadata__": {"format": "pt", **(metadata or {})}}
        self.offsets: dict[str, tuple[int, int, torch.dtype, tuple[int, ...]]] = {}
        pos = 0
        for name, dtype, shape in entries:
            if dtype not in TORCH_TO_ST:
                raise WeightsmithError(f"tensor {name!r}: dtype {dtype} cannot be stored in safetensors")
            n = ST_DTYPES[TORCH_TO_ST[dtype]][1]
            for s in shape:
                n *= s
            header[name] = {"dtype": TORCH_TO_ST[dtype], "shape": list(shape), "data_offsets": [pos, pos + n]}
            self.offsets[name] = (pos, pos + n, dtype, tuple(shape))
            pos += n
        raw = json.dumps(header, separators=(",", ":")).encode()
        raw += b" " * (_align8(len(raw)) - len(raw))
        self.data_start = 8 + len(raw)
        self.size = self.data_start + pos
        self.pending = set(self.offsets)
        self._fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_TRUNC, 0o644)
        os.pwrite(self._fd, struct.pack("<Q", len(raw)) + raw, 0)
        os.ftruncate(self._fd, self.size)

    def write(self, name: str, tensor: torch.Tensor) -> None:
        begin, end, dtype, shape = self.offsets[name]
        if tuple(tensor.shape) != shape or tensor.dtype != dtype:
            raise WeightsmithError(
                f"tensor {name!r}: got shape {list(tensor.shape)} {tensor.dtype}, planned {list(shape)} {dtype}")
        if name not in self.pending:
            raise WeightsmithError(f"tensor {name!r} written twice")
        data = tensor.detach().to("cpu").contiguous().reshape(-1).view(torch.uint8).numpy()
        view = memoryview(data)
        pos = self.data_start + begin
        while view.nbytes:
            written = os.pwrite(self._fd, view, pos)
            view = view[written:]
            pos += written
        self.pending.discard(name)

    def close(self) -> None:
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1


def save_file(tensors: dict[str, torch.Tensor], path: Path, metadata: dict[str, str] | None = None) -> None:
    shard = ShardFile(path, [(k, v.dtype, tuple(v.shape)) for k, v in tensors.items()], metadata)
    try:
        for k, v in tensors.items():
            shard.write(k, v)
    finally:
        shard.close()
