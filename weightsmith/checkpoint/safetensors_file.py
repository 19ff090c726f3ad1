"""safetensors headers read and checked by hand, and shards written tensor by tensor.

The header is parsed without touching tensor data so a folder is validated (sizes, offsets,
dtypes, overlaps) before any tensor is read. Writing lays out a shard from its plan first, so
each tensor's bytes can go straight to their offset as soon as they are computed.
"""
from __future__ import annotations

import json
import os
import stat
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


NOT_REGULAR = "not a regular file (a FIFO, device or folder); model files must be plain files"


def open_regular(path: Path) -> int:
    """A read-only descriptor on ``path``, refused unless it is a regular file. The open never blocks
    (a FIFO or device named as a model file is refused, not waited on)."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | getattr(os, "O_CLOEXEC", 0))
    except FileNotFoundError:
        raise
    except OSError as exc:
        raise WeightsmithError(f"{path}: cannot read ({exc.strerror})") from None
    if not stat.S_ISREG(os.fstat(fd).st_mode):
        os.close(fd)
        raise WeightsmithError(f"{path}: {NOT_REGULAR}")
    return fd


ENTRY_KEYS = {"dtype", "shape", "data_offsets"}


def _ints(value: object, count: int | None = None) -> bool:
    """A JSON list of non-negative integers (``True`` and ``2.0`` are not integers), of ``count`` items if given."""
    return (isinstance(value, list) and (count is None or len(value) == count)
            and all(type(v) is int and v >= 0 for v in value))


def no_duplicates(pairs: list) -> dict:
    """``object_pairs_hook`` for json.loads: a key given twice is refused, not silently overwritten."""
    seen = {}
    for k, v in pairs:
        if k in seen:
            raise WeightsmithError(f"names {k!r} twice")
        seen[k] = v
    return seen


def read_header(path: Path) -> tuple[dict[str, TensorInfo], dict[str, str]]:
    """Parse and validate one safetensors file's header. Returns (tensors, metadata).

    Checked as strictly as the format allows: a JSON object whose ``__metadata__`` maps strings to strings and
    whose every other entry has exactly a known dtype, a shape of non-negative integers and two integer offsets
    spanning exactly shape x dtype-size bytes; the tensors tile the data section with no gap, overlap or
    trailing byte. Only a regular file is opened (a FIFO is refused, never waited on)."""
    raw, size = _read_raw_header(path)
    header = _parse_header(path, raw)
    metadata = header.pop("__metadata__", None)
    if metadata is None:
        metadata = {}
    if not isinstance(metadata, dict) or not all(isinstance(v, str) for v in metadata.values()):
        raise WeightsmithError(f"{path}: corrupt safetensors header (__metadata__ must map names to strings, "
                               f"got {json.dumps(metadata)[:80]})")
    n = len(raw)
    data_len = size - 8 - n
    tensors = {name: _tensor_entry(path, name, entry, 8 + n, data_len) for name, entry in header.items()}
    _check_tiling(path, tensors, data_len)
    return tensors, dict(metadata)


def _read_raw_header(path: Path) -> tuple[bytes, int]:
    """The header's bytes and the file's size."""
    try:
        with os.fdopen(open_regular(path), "rb") as f:
            size = os.fstat(f.fileno()).st_size
            raw_len = f.read(8)
            if len(raw_len) < 8:
                raise WeightsmithError(f"{path}: truncated safetensors file ({size} bytes, no header); re-download or re-save it")
            (n,) = struct.unpack("<Q", raw_len)
            if n > MAX_HEADER or 8 + n > size:
                raise WeightsmithError(f"{path}: corrupt safetensors header (claims {n} header bytes in a {size}-byte file)")
            return f.read(n), size
    except FileNotFoundError:
        raise WeightsmithError(f"{path}: no such file") from None
    except OSError as exc:
        raise WeightsmithError(f"{path}: cannot read ({exc.strerror})") from None


def _parse_header(path: Path, raw: bytes) -> dict:
    try:
        header = json.loads(raw, object_pairs_hook=no_duplicates)
    except WeightsmithError as exc:
        raise WeightsmithError(f"{path}: corrupt safetensors header ({exc})") from None
    except RecursionError:
        raise WeightsmithError(f"{path}: corrupt safetensors header (JSON nested too deeply)") from None
    except (UnicodeDecodeError, ValueError) as exc:
        raise WeightsmithError(f"{path}: corrupt safetensors header (not JSON: {exc})") from None
    if not isinstance(header, dict):
        raise WeightsmithError(f"{path}: corrupt safetensors header (not a JSON object)")
    return header


def _tensor_entry(path: Path, name: str, entry, data_start: int, data_len: int) -> TensorInfo:
    """One tensor's header entry, checked: exactly dtype, shape and offsets, spanning its bytes inside the data."""
    if not isinstance(entry, dict) or set(entry) != ENTRY_KEYS:
        keys = sorted(entry) if isinstance(entry, dict) else type(entry).__name__
        raise WeightsmithError(f"{path}: tensor {name!r} has a malformed header entry (needs exactly dtype, "
                               f"shape and data_offsets; has {keys})")
    dtype, shape, offsets = entry["dtype"], entry["shape"], entry["data_offsets"]
    if not isinstance(dtype, str) or dtype not in ST_DTYPES:
        raise WeightsmithError(f"{path}: tensor {name!r} has unknown dtype {dtype!r}")
    if not _ints(shape):
        raise WeightsmithError(f"{path}: tensor {name!r} has shape {json.dumps(shape)[:80]}; a shape is a list "
                               "of non-negative integers")
    if not _ints(offsets, 2) or offsets[0] > offsets[1]:
        raise WeightsmithError(f"{path}: tensor {name!r} has invalid offsets {json.dumps(offsets)[:80]}; they "
                               "must be two integers begin <= end")
    info = TensorInfo(name, dtype, tuple(shape), path, offsets[0], offsets[1], data_start)
    if info.end > data_len:
        raise WeightsmithError(
            f"{path}: tensor {name!r} ends at byte {info.end} but the file holds {data_len} data bytes (truncated file)")
    if info.nbytes != info.numel * ST_DTYPES[dtype][1]:
        raise WeightsmithError(
            f"{path}: tensor {name!r} with shape {list(shape)} and dtype {dtype} needs "
            f"{info.numel * ST_DTYPES[dtype][1]} bytes but its offsets span {info.nbytes}")
    return info


def _check_tiling(path: Path, tensors: dict[str, TensorInfo], data_len: int) -> None:
    """The tensors fill the data section exactly: no overlap, gap or trailing byte."""
    pos, last = 0, None
    for info in sorted(tensors.values(), key=lambda i: (i.begin, i.end)):
        if info.begin < pos:
            raise WeightsmithError(f"{path}: tensors {last!r} and {info.name!r} overlap in the file (corrupt header)")
        if info.begin > pos:
            raise WeightsmithError(f"{path}: {info.begin - pos} unused bytes before tensor {info.name!r} "
                                   "(corrupt header: tensors must fill the data section)")
        pos, last = info.end, info.name
    if pos != data_len:
        raise WeightsmithError(f"{path}: {data_len - pos} bytes after the last tensor's data (trailing bytes: "
                               "corrupt or appended to; re-save the file)")


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
