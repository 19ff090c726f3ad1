"""Lazy reader for Hugging Face model folders: config.json + one or many safetensors shards.

Opening a folder reads headers only and validates the whole folder (index against shards,
offsets, duplicate names) before any tensor is touched. Tensors are then read one at a time
from memory-mapped files, so a stage holds only what it asks for.
"""
from __future__ import annotations

import mmap
import os
import re
from collections.abc import Iterator, Mapping
from pathlib import Path

import torch
from safetensors import safe_open

from ..errors import WeightsmithError, needs_option
from .files import member, read_json
from .formats import stock_config
from .safetensors_file import TORCH_TO_ST, TensorInfo, read_header

INDEX_NAME = "model.safetensors.index.json"
SINGLE_NAME = "model.safetensors"
PICKLE_NAMES = ("pytorch_model.bin", "pytorch_model.bin.index.json")
# Files that describe a model rather than hold its weights; copied to outputs.
# madvise(MADV_POPULATE_READ) (Linux 5.14+) maps a range's pages read-only up front; MAP_POPULATE would not
# do: on a private writable mapping it breaks copy-on-write, i.e. copies every page.
MADV_POPULATE_READ = getattr(mmap, "MADV_POPULATE_READ", 22 if os.uname().sysname == "Linux" else None)
SIDE_FILES = (
    "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "vocab.txt", "vocab.json",
    "merges.txt", "tokenizer.model", "added_tokens.json", "generation_config.json", "chat_template.jinja",
    "preprocessor_config.json",
)


# Other files some stage reads from a model folder (MWA's metric, a LoRA adapter's config).
OTHER_READ = ("trainer_state.json", "adapter_config.json")


def check_side_files(folder: Path) -> None:
    """Refuse a folder whose config or tokenizer files lead out of it or are not regular files, or whose
    ``tokenizer.json`` the tokenizer loader would refuse (so every command, and a dry run, refuses it up front)."""
    from .tokenizer_files import check_tokenizer_files

    for name in ("config.json", *SIDE_FILES, *OTHER_READ):
        member(folder, name, folder)
    check_tokenizer_files(folder)


# config.json fields every stage may read, with the types transformers writes (None always allowed).
CONFIG_TYPES = {"model_type": str, "_name_or_path": str, "torch_dtype": str, "dtype": str, **dict.fromkeys((
    "hidden_size", "num_hidden_layers", "num_attention_heads", "num_key_value_heads", "intermediate_size",
    "vocab_size", "max_position_embeddings", "head_dim"), int)}


CLASS_NAME = re.compile(r"^[A-Z][A-Za-z0-9_]*$")  # transformers' model classes; its functions are lower case


def check_config(config: dict, path: Path) -> dict:
    """``config`` unless a field weightsmith reads has the wrong type (``architectures`` must name classes)."""
    archs = config.get("architectures")
    if archs is not None and not (isinstance(archs, list) and all(isinstance(a, str) and CLASS_NAME.match(a)
                                                                  for a in archs)):
        raise WeightsmithError(f"{path}: 'architectures' is {archs!r}; it must be a list of model class names "
                               "(e.g. LlamaForCausalLM)")
    for key, kind in CONFIG_TYPES.items():
        value = config.get(key)
        if value is not None and (not isinstance(value, kind) or isinstance(value, bool)
                                  or (kind is int and value < 0)):
            raise WeightsmithError(f"{path}: '{key}' is {value!r}; it must be "
                                   f"{'a non-negative integer' if kind is int else 'a string'}")
    return config


class Checkpoint:
    """A validated model folder. ``ckpt.get(name)`` reads one tensor; nothing is loaded eagerly."""

    def __init__(self, path: str | Path, allow_pickle: bool = False):
        self.path = Path(path)
        if not self.path.is_dir():
            raise WeightsmithError(f"{self.path}: not a model folder (no such directory)")
        check_side_files(self.path)
        self.config = check_config(stock_config(read_json(self.path / "config.json", "config.json")),
                                   self.path / "config.json") if (self.path / "config.json").exists() else None
        self.tensors: dict[str, TensorInfo] = {}
        self.metadata: dict[str, str] = {}
        self._handles: dict[Path, object] = {}
        self._pickled: dict[str, torch.Tensor] | None = None
        index = self.path / INDEX_NAME
        if os.path.lexists(index):
            self._open_index(member(self.path, INDEX_NAME, self.path))
        elif os.path.lexists(self.path / SINGLE_NAME):
            self._add_shard(member(self.path, SINGLE_NAME, self.path))
        else:
            loose = sorted(p for p in self.path.glob("*.safetensors"))
            if len(loose) == 1:
                self._add_shard(member(self.path, loose[0].name, self.path))
            elif loose:
                raise WeightsmithError(
                    f"{self.path}: {len(loose)} safetensors files but no {INDEX_NAME}; add the index or keep one file")
            elif any((self.path / n).exists() for n in PICKLE_NAMES):
                if not allow_pickle:
                    raise needs_option(f"{self.path}: only pickle (.bin) weights found; loading them runs arbitrary "
                                       "code", ". Set {0} if you trust this folder, or convert it to safetensors",
                                       "allow_pickle")
                self._open_pickle()
            else:
                raise WeightsmithError(f"{self.path}: no model weights (*.safetensors) found")

    # -- opening -------------------------------------------------------------------------
    def _add_shard(self, file: Path, expected: set[str] | None = None) -> None:
        infos, meta = read_header(file)
        for name, info in infos.items():
            if name in self.tensors:
                raise WeightsmithError(
                    f"{self.path}: tensor {name!r} appears in both {self.tensors[name].file.name} and {file.name}")
            if expected is not None and name not in expected:
                raise WeightsmithError(f"{file}: tensor {name!r} is not listed in {INDEX_NAME}")
            self.tensors[name] = info
        self.metadata.update(meta)

    def _open_index(self, index: Path) -> None:
        data = read_json(index, INDEX_NAME)
        weight_map = data.get("weight_map")
        if not isinstance(weight_map, dict) or not weight_map:
            raise WeightsmithError(f"{index}: missing or empty 'weight_map'")
        by_file: dict[str, set[str]] = {}
        for name, file in weight_map.items():
            if not isinstance(file, str):
                raise WeightsmithError(f"{index}: weight_map[{name!r}] is {file!r}, not a shard file name")
            by_file.setdefault(file, set()).add(name)
        for file in sorted(by_file):
            shard = member(self.path, file, index)
            if not shard.exists():
                some = sorted(by_file[file])[0]
                raise WeightsmithError(
                    f"{index}: shard {file} (holding {some!r} and {len(by_file[file]) - 1} more) does not exist")
            self._add_shard(shard, by_file[file])
            missing = by_file[file] - {n for n, i in self.tensors.items() if i.file == shard}
            if missing:
                raise WeightsmithError(f"{shard}: tensor {sorted(missing)[0]!r} listed in {INDEX_NAME} is missing from the shard")

    def _open_pickle(self) -> None:
        files = [member(self.path, f.name, self.path) for f in sorted(self.path.glob("pytorch_model*.bin"))]
        state: dict[str, torch.Tensor] = {}
        for f in files:
            part = torch.load(f, map_location="cpu", weights_only=False, mmap=True)
            for k, v in part.items():
                if k in state:
                    raise WeightsmithError(f"{self.path}: tensor {k!r} appears in two .bin files")
                state[k] = v
        self._pickled = state
        for k, v in state.items():
            self.tensors[k] = TensorInfo(k, TORCH_TO_ST[v.dtype], tuple(v.shape), files[0], 0, v.numel() * v.element_size())

    # -- queries ------------------------------------------------------------------------
    def names(self) -> list[str]:
        return list(self.tensors)

    def __contains__(self, name: str) -> bool:
        return name in self.tensors

    def __len__(self) -> int:
        return len(self.tensors)

    def info(self, name: str) -> TensorInfo:
        try:
            return self.tensors[name]
        except KeyError:
            raise WeightsmithError(f"{self.path}: no tensor named {name!r}") from None

    @property
    def num_params(self) -> int:
        return sum(i.numel for i in self.tensors.values())

    @property
    def nbytes(self) -> int:
        return sum(i.nbytes for i in self.tensors.values())

    @property
    def files(self) -> list[Path]:
        return sorted({i.file for i in self.tensors.values()})

    @property
    def size_on_disk(self) -> int:
        return sum(f.stat().st_size for f in self.files)

    def get(self, name: str, device: str | torch.device = "cpu") -> torch.Tensor:
        info = self.info(name)
        if self._pickled is not None:
            return self._pickled[name].to(device)
        handle = self._handles.get(info.file)
        if handle is None:
            handle = self._handles[info.file] = safe_open(str(info.file), framework="pt", device="cpu")
        t = handle.get_tensor(name)
        return t if str(device) == "cpu" else t.to(device)

    def read(self, name: str, rows: int | None = None, dtype: torch.dtype | None = None,
             device: str | torch.device = "cpu") -> torch.Tensor:
        """A tensor the caller owns, read with one pread into fresh memory (no file mapping stays
        resident), optionally only its first ``rows`` rows and converted to ``dtype`` on ``device``."""
        info = self.info(name)
        shape = info.shape if rows is None else (min(rows, info.shape[0]), *info.shape[1:])
        if self._pickled is not None:
            t = self._pickled[name][: shape[0]] if rows is not None else self._pickled[name]
            return t.to(device=device, dtype=dtype or t.dtype, copy=True)
        raw = torch.empty(shape, dtype=info.torch_dtype)
        buf = memoryview(raw.reshape(-1).view(torch.uint8).numpy())
        pos = info.data_start + info.begin
        with open(info.file, "rb", buffering=0) as f:
            while buf.nbytes:
                got = os.preadv(f.fileno(), [buf], pos)
                if got <= 0:
                    raise WeightsmithError(f"{info.file}: tensor {name!r}: file ended early (truncated?)")
                buf, pos = buf[got:], pos + got
        return raw.to(device=device, dtype=dtype or raw.dtype)

    def map(self, name: str, rows: int | None = None) -> torch.Tensor:
        """A CPU tensor in the stored dtype backed by a private, copy-on-write mapping of just its bytes:
        reading it costs no copy (the pages come from the page cache), writing to it copies only the pages
        written and never reaches the file, and unmapping when the tensor is freed returns the memory.
        Every page is faulted in now, in the calling thread, rather than on first touch. Falls back to
        ``read`` for pickled checkpoints and data not aligned for its dtype."""
        info = self.info(name)
        shape = info.shape if rows is None else (min(rows, info.shape[0]), *info.shape[1:])
        start = info.data_start + info.begin
        itemsize = torch.empty((), dtype=info.torch_dtype).element_size()
        count = 1
        for s in shape:
            count *= s
        if self._pickled is not None or start % itemsize or count == 0:
            return self.read(name, rows)
        page = start - start % mmap.ALLOCATIONGRANULARITY
        with open(info.file, "rb") as f:
            try:
                mapped = mmap.mmap(f.fileno(), start - page + count * itemsize, flags=mmap.MAP_PRIVATE,
                                   prot=mmap.PROT_READ | mmap.PROT_WRITE, offset=page)
            except (OSError, ValueError) as exc:
                raise WeightsmithError(f"{info.file}: tensor {name!r}: cannot map its data ({exc})") from None
        if MADV_POPULATE_READ is not None:
            try:
                mapped.madvise(MADV_POPULATE_READ)
            except OSError:  # an older kernel: pages fault in on first touch instead
                pass
        flat = torch.frombuffer(mapped, dtype=info.torch_dtype, count=count, offset=start - page)
        return flat.reshape(shape)

    def items(self, names: list[str] | None = None) -> Iterator[tuple[str, torch.Tensor]]:
        for n in names or self.names():
            yield n, self.get(n)

    def lazy(self, names: dict[str, str] | None = None) -> "LazyTensors":
        """A read-only mapping of tensors mapped when looked up (see ``map``), never all at once; ``names`` gives
        the keys and the stored tensor behind each (default: every stored name)."""
        return LazyTensors(self, names if names is not None else {n: n for n in self.names()})

    def state_dict(self) -> dict[str, torch.Tensor]:
        return dict(self.items())

    def side_files(self) -> list[Path]:
        return [self.path / n for n in SIDE_FILES if (self.path / n).is_file()]

    def close(self) -> None:
        self._handles.clear()

    def __repr__(self) -> str:
        return f"Checkpoint({str(self.path)!r}, {len(self)} tensors)"



class LazyTensors(Mapping):
    """Key -> the stored tensor behind it, mapped in the stored dtype on every lookup and freed with it."""

    def __init__(self, ckpt: Checkpoint, names: dict[str, str]):
        self.ckpt, self.names = ckpt, names

    def __getitem__(self, key: str) -> torch.Tensor:
        return self.ckpt.map(self.names[key])

    def __iter__(self) -> Iterator[str]:
        return iter(self.names)

    def __len__(self) -> int:
        return len(self.names)
