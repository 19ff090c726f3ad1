"""Atomic, locked, streaming output folders: the one writer every stage uses.

``check_output`` refuses an output inside an input, an existing one without --force, a link or a file, and
locks it (a second run to the same folder fails at once); ``output_folder`` hands out a temporary directory
beside the target and swaps it into place only when the stage succeeds, so an interrupted run never leaves
a folder that looks finished, nor leaves the user without OUT.
``ShardedWriter`` lays out shards from a plan (names, dtypes, shapes) and writes each tensor
straight to its place on disk: no shard is ever buffered in memory.
"""
from __future__ import annotations

import atexit
import ctypes
import errno
import fcntl
import glob
import json
import os
import re
import shutil
import sys
import uuid
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path

import torch

from ..errors import WeightsmithError, needs_option
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
    """Refuse an output inside an input, existing without --force, a link or a file; then lock it for this process.

    Call it before any computation: it also finds an unwritable parent (read-only disk, no permission) and
    another run writing the same folder (the lock), finishes a replace a killed run left half done and
    removes the temp folders of dead runs. The lock is held until ``output_folder`` commits, or the process ends.
    """
    target = Path(target)
    for inp in inputs:
        inp = Path(inp)
        if _inside(target, inp):
            raise WeightsmithError(f"output {target} is inside input {inp}; choose a folder outside every input")
        if force and _inside(inp, target):
            raise needs_option(f"{target} holds input {inp}", "; {0} would delete it", "force")
    if target.is_symlink():
        raise WeightsmithError(f"{target} is a symbolic link (to {os.readlink(target)}); give a real folder path")
    if target.exists() and not target.is_dir():
        raise WeightsmithError(f"{target} exists and is not a folder")
    if target.exists() and os.path.ismount(target):  # the result is renamed into place, which a mount cannot take
        raise WeightsmithError(f"{target} is a mount point; write to a folder inside it")
    if target.exists() and not force and not _journal(target).exists():
        raise needs_option(f"{target} already exists", "; {0} replaces it", "force")
    if _VALIDATE_ONLY:
        raise ChecksPassed(target)
    _probe_writable(target)
    _lock(target)
    try:
        _recover(target)
        _clean_stale(target)
        if target.exists() and not force:
            raise needs_option(f"{target} already exists", "; {0} replaces it", "force")
    except BaseException:
        _unlock(target)
        raise
    return target


class ChecksPassed(BaseException):
    """Raised by ``check_output`` under ``validate_only()``: every check a stage makes before its output is
    locked passed. (A BaseException, so no stage's ``except Exception`` mistakes it for a failure.)"""


_VALIDATE_ONLY = False


@contextmanager
def validate_only() -> Iterator[None]:
    """Run a stage only up to its ``check_output`` call, which raises ``ChecksPassed`` (``run --dry-run``)."""
    global _VALIDATE_ONLY
    saved, _VALIDATE_ONLY = _VALIDATE_ONLY, True
    try:
        yield
    finally:
        _VALIDATE_ONLY = saved


@contextmanager
def output_folder(target: str | Path, inputs: Iterable[str | Path] = (), force: bool = False) -> Iterator[Path]:
    """Yield a temp folder ``TARGET.tmp-PID-*``; on success it replaces ``target`` atomically.

    A replace exchanges the two folders in one system call (Linux ``renameat2``); elsewhere it is journalled
    so the next run finishes it. Write errors (full or read-only disk) become one-line ``WeightsmithError``s.
    """
    target = check_output(target, list(inputs), force)
    try:
        tmp = target.parent / f"{target.name}{TMP_MARK}{os.getpid()}-{uuid.uuid4().hex[:8]}"
        try:
            target.parent.mkdir(parents=True, exist_ok=True)
            tmp.mkdir()
        except OSError as exc:
            raise _write_error(target, exc) from None
        try:
            yield tmp
            _commit(tmp, target, force)
        except OSError as exc:
            shutil.rmtree(tmp, ignore_errors=True)
            if _is_write_error(exc, tmp):
                raise _write_error(target, exc) from None
            raise
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
    finally:
        _unlock(target)


TMP_MARK = ".tmp-"
OLD_MARK = ".old-"
_TMP_NAME = re.compile(r"\.(?:tmp|old)-(\d+)-[0-9a-f]{8}")
_WRITE_ERRNOS = {errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EACCES, errno.EPERM, errno.EFBIG, errno.ENOTDIR}
_LOCKS: dict[Path, int] = {}  # resolved target -> fd of its held lock file


def _lock_path(target: Path) -> Path:
    """The lock file of an output: in a per-user folder under the system temp dir, named by a hash of the
    output's resolved path, so that nothing but the output is ever written beside it."""
    import hashlib
    import tempfile

    uid = os.getuid() if hasattr(os, "getuid") else 0
    name = hashlib.sha256(str(target.resolve()).encode()).hexdigest()[:24]
    return Path(tempfile.gettempdir()) / f"weightsmith-locks-{uid}" / f"{name}.lock"


def _journal(target: Path) -> Path:
    return target.parent / f".{target.name}.weightsmith-replace"


def _write_error(target: Path, exc: OSError) -> WeightsmithError:
    hint = ("free space on that disk or choose another folder with -o" if exc.errno in (errno.ENOSPC, errno.EDQUOT)
            else "choose a writable folder with -o")
    return WeightsmithError(f"cannot write {target}: {exc.strerror or exc}; {hint}")


def _is_write_error(exc: OSError, tmp: Path) -> bool:
    if exc.errno in (errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EFBIG):
        return True
    return exc.errno in _WRITE_ERRNOS and exc.filename is not None and \
        (Path(exc.filename) == tmp or tmp in Path(exc.filename).parents)


def _lock(target: Path) -> None:
    """Take OUT's lock file (flock, not waiting): a second run to OUT fails at once, naming the holder's pid."""
    key = target.resolve()
    if key in _LOCKS:
        return
    path = _lock_path(target)
    while True:
        try:
            path.parent.mkdir(mode=0o700, exist_ok=True)
            fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
        except OSError as exc:
            raise WeightsmithError(f"cannot lock {target}: {exc.strerror} ({path})") from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 32, 0).decode(errors="replace").strip() or "?"
            os.close(fd)
            raise WeightsmithError(f"{target} is being written by another weightsmith run (pid {holder}); "
                                   "wait for it to finish or choose another output folder") from None
        try:
            same = os.fstat(fd).st_ino == os.stat(path).st_ino
        except FileNotFoundError:
            same = False
        if same:  # not unlinked by the previous holder between our open and our flock
            break
        os.close(fd)
    try:
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
    except OSError as exc:
        os.close(fd)
        raise WeightsmithError(f"cannot lock {target}: {exc.strerror} ({path})") from None
    _LOCKS[key] = fd


def _probe_writable(target: Path) -> None:
    """Create and remove a folder where OUT's temp folder will go (or in the nearest existing folder above)."""
    above = next(p for p in (target.parent, *target.parent.parents) if p.exists() or p.is_symlink())
    if not above.is_dir():
        raise WeightsmithError(f"cannot write {target}: {above} is not a folder")
    probe = above / f"{target.name}{TMP_MARK}{os.getpid()}-{uuid.uuid4().hex[:8]}"
    try:
        probe.mkdir()
        probe.rmdir()
    except OSError as exc:
        raise _write_error(target, exc) from None


def _unlock(target: Path) -> None:
    fd = _LOCKS.pop(target.resolve(), None)
    if fd is None:
        return
    try:
        _lock_path(target).unlink()
    except OSError:
        pass
    os.close(fd)


@atexit.register
def _unlock_all() -> None:
    for key in list(_LOCKS):
        _unlock(key)


def _pid_alive(pid: int) -> bool:
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _clean_stale(target: Path) -> None:
    """Remove ``OUT.tmp-PID-*`` / ``OUT.old-PID-*`` folders of runs that died (their pid is gone); lock held."""
    for p in target.parent.glob(f"{glob.escape(target.name)}.*-*"):
        m = _TMP_NAME.fullmatch(p.name[len(target.name):])
        if m and not _pid_alive(int(m.group(1))) and not p.is_symlink():
            shutil.rmtree(p, ignore_errors=True)


def _recover(target: Path) -> None:
    """Finish a journalled replace that a killed run left half done (lock held)."""
    journal = _journal(target)
    try:
        names = json.loads(journal.read_text())
        new, old = target.parent / names["new"], target.parent / names["old"]
    except FileNotFoundError:
        return
    except (OSError, ValueError, KeyError, TypeError):
        journal.unlink(missing_ok=True)
        return
    if new.is_dir():
        if target.exists() and not old.exists():
            target.rename(old)
        if not target.exists():
            new.rename(target)
    if old.exists():
        shutil.rmtree(old, ignore_errors=True)
    journal.unlink(missing_ok=True)


def _renameat2(src: Path, dst: Path, flags: int) -> bool:
    """Linux renameat2; False where the C library or the file system lacks it."""
    if not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        fn = libc.renameat2
    except (OSError, AttributeError):
        return False
    fn.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
    if fn(-100, os.fsencode(src), -100, os.fsencode(dst), flags) == 0:  # -100: AT_FDCWD
        return True
    err = ctypes.get_errno()
    if err in (errno.EINVAL, errno.ENOSYS, errno.ENOTSUP):
        return False
    raise OSError(err, os.strerror(err), str(dst))


_RENAME_NOREPLACE, _RENAME_EXCHANGE = 1, 2


def _commit(tmp: Path, target: Path, force: bool) -> None:
    if target.exists() or target.is_symlink():
        if not force:  # appeared while this run computed (not through weightsmith, which holds the lock)
            kept = target.parent / f"{target.name}.result-{uuid.uuid4().hex[:8]}"
            tmp.rename(kept)
            raise needs_option(f"{target} appeared while this run was writing it; nothing was replaced, the result "
                               f"is in {kept}", " ({0} replaces it)", "force")
        if target.is_symlink() or not target.is_dir():
            raise WeightsmithError(f"{target} was replaced by a file or link while this run was writing it")
        if _renameat2(tmp, target, _RENAME_EXCHANGE):
            shutil.rmtree(tmp, ignore_errors=True)  # now the old folder; a kill here leaves a stale, cleaned tmp
            return
        old = target.parent / f"{target.name}{OLD_MARK}{os.getpid()}-{uuid.uuid4().hex[:8]}"
        journal = _journal(target)
        with open(journal, "w") as f:
            json.dump({"new": tmp.name, "old": old.name}, f)
            f.flush()
            os.fsync(f.fileno())
        target.rename(old)
        tmp.rename(target)
        shutil.rmtree(old, ignore_errors=True)
        journal.unlink(missing_ok=True)
        return
    if not _renameat2(tmp, target, _RENAME_NOREPLACE):
        tmp.rename(target)


def write_file_atomic(path: str | Path, text: str) -> None:
    """Replace the file ``path`` with ``text`` in one rename (a reader sees the old or the new file, never half)."""
    path = Path(path)
    tmp = path.parent / f".{path.name}{TMP_MARK}{os.getpid()}-{uuid.uuid4().hex[:8]}"
    try:
        tmp.write_text(text)
        os.replace(tmp, path)
    except OSError as exc:
        tmp.unlink(missing_ok=True)
        raise _write_error(path, exc) from None


def check_free_space(folder: Path, needed: int) -> None:
    """Refuse before writing when the file system holding ``folder`` has less than ``needed`` bytes free."""
    try:
        free = shutil.disk_usage(folder).free
    except OSError:
        return
    if free < needed:
        shown = folder.parent / folder.name.split(TMP_MARK)[0]
        raise WeightsmithError(f"cannot write {shown}: it needs {_size(needed)} but the disk has {_size(free)} free; "
                               "free space or choose another folder with -o")


def _size(n: int) -> str:
    for unit, scale in (("GB", 10**9), ("MB", 10**6), ("KB", 10**3)):
        if n >= scale:
            return f"{n / scale:.1f} {unit}"
    return f"{n} bytes"


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
        check_free_space(self.folder, sum(torch.Size(e[2]).numel() * torch.empty((), dtype=e[1]).element_size()
                                          for e in plan))
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
