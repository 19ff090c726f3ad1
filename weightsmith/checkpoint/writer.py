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
import stat
import sys
import uuid
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path

import torch

from ..errors import WeightsmithError, needs_option
from .exact import check_layer_count, check_tensors, config_object, model_class
from .formats import read_config, written_config
from .reader import INDEX_NAME, SINGLE_NAME, SIDE_FILES, Checkpoint
from .safetensors_file import ShardFile
from .values import finite, nonfinite_count

DEFAULT_SHARD_SIZE = 5 * 10**9
from ..options import parse_size  # noqa: E402,F401  (the one size grammar; re-exported)


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
    check_replaceable(target)
    if _VALIDATE_ONLY:
        raise ChecksPassed(target)
    _probe_writable(target)
    created = _make_parents(target)
    try:
        _lock(target, created)
    except BaseException:
        _remove_empty(created)
        raise
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
def output_folder(target: str | Path, inputs: Iterable[str | Path] = (), force: bool = False, *,
                  stage: str | None = None, values_checked: bool = False) -> Iterator[Path]:
    """Yield a temp folder ``TARGET.tmp-PID-*``; on success it replaces ``target`` atomically.

    A replace exchanges the two folders in one system call (Linux ``renameat2``); elsewhere it is journalled
    so the next run finishes it. Write errors (full or read-only disk) become one-line ``WeightsmithError``s.
    Every tensor written into it passes the publish check (``ShardedWriter.write``): a NaN/inf refuses the
    whole output, naming the tensor and ``stage``; ``values_checked``: the stage checked every value itself
    (merge's value checks, which let ``allow_nonfinite`` through).
    """
    target = check_output(target, list(inputs), force)
    tmp = target.parent / f"{target.name}{TMP_MARK}{os.getpid()}-{uuid.uuid4().hex[:8]}"
    try:
        try:
            tmp.mkdir()
            (tmp / MARKER).write_text("weightsmith\n")
        except OSError as exc:
            raise _write_error(target, exc) from None
        _PUBLISHING[tmp] = (target, stage or "the stage", values_checked)
        try:
            yield tmp
            _check_shapes(tmp, target, stage or "the stage")
            _commit(tmp, target, force)
        except OSError as exc:
            _remove_own(tmp)
            if _is_write_error(exc, tmp):
                raise _write_error(target, exc) from None
            raise
        except BaseException:
            _remove_own(tmp)
            raise
    finally:
        _PUBLISHING.pop(tmp, None)
        _unlock(target)


def _check_shapes(tmp: Path, target: Path, stage: str) -> None:
    """The publish check of a finished output: its config.json fits its tensors (``check_folder``)."""
    try:
        check_folder(tmp, target)
    except WeightsmithError as exc:
        raise WeightsmithError(f"{stage} wrote a model that is not exactly its tensors, so {target} was not "
                               f"written: {exc}") from None


def check_folder(folder: Path, shown: Path) -> None:
    """A folder a stage wrote: its config.json fits its tensors, as ``weightsmith.load`` will check it (messages
    name ``shown``). Folders without a config, with custom code, or whose config transformers cannot build are
    left to the reader."""
    if not (folder / "config.json").is_file() or not any(folder.glob("*.safetensors")):
        return
    config = read_config(folder)
    fmt = (config.get("weightsmith") or {}).get("format", "plain")
    ckpt = Checkpoint(folder)
    try:
        _check_written(config, fmt, ckpt, shown)
    finally:
        ckpt.close()


def _check_written(config: dict, fmt: str, ckpt, shown: Path) -> None:
    if fmt == "folded":
        members = {j for group in config["weightsmith"].get("groups", []) for j in group[1:]}
        check_layer_count(shown, config, ckpt.names(), skip=members)
    elif fmt != "plain":
        check_layer_count(shown, config, ckpt.names())
    elif not config.get("auto_map"):
        cls = model_class(config)
        try:
            cfg = config_object(config, cls)
        except Exception:  # noqa: BLE001 - the reader words what transformers refuses
            return
        check_tensors(cls, cfg, ckpt, shown)


def check_publishable(folder: Path, name: str, tensor: torch.Tensor) -> None:
    """The publish check of a tensor written into an output folder: finite, or the stage writes nothing."""
    folder = Path(folder)
    publishing = next((v for tmp, v in _PUBLISHING.items() if tmp == folder or tmp in folder.parents), None)
    if publishing is None or publishing[2] or finite(tensor):
        return
    target, stage, _ = publishing
    raise WeightsmithError(f"{stage} produced tensor {name!r} holding {nonfinite_count(tensor)} NaN/inf value(s); "
                           f"a non-finite model is never published, so {target} was not written")


TMP_MARK = ".tmp-"
OLD_MARK = ".old-"
LOCK_MARK = ".weightsmith-lock"
MARKER = ".weightsmith-output"  # written into every output folder: what --force may replace
_TMP_NAME = re.compile(r"\.(?:tmp|old)-(\d+)-[0-9a-f]{8}")
_WRITE_ERRNOS = {errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EACCES, errno.EPERM, errno.EFBIG, errno.ENOTDIR}
_PUBLISHING: dict[Path, tuple[Path, str, bool]] = {}  # temp folder -> (target, stage, values checked) while written
# resolved target -> (lock file fd, lock folder fd, target, the folders above it created for it)
_LOCKS: dict[Path, tuple[int, int, Path, list[Path]]] = {}


def written_by_weightsmith(folder: Path) -> bool:
    """True when ``folder`` (not a link) holds the marker ``output_folder`` writes into every output."""
    try:
        return not folder.is_symlink() and stat.S_ISREG(os.lstat(folder / MARKER).st_mode)
    except OSError:
        return False


def check_replaceable(target: Path) -> None:
    """Refuse an existing ``target`` that weightsmith did not write: no option makes weightsmith delete it."""
    if target.exists() and not written_by_weightsmith(target):
        raise WeightsmithError(f"{target} exists and was not written by weightsmith (it has no {MARKER}); it is "
                               "never replaced: remove it yourself or choose another output folder")


def _own_name(target: Path, name: str) -> bool:
    """True for a name this module generates beside ``target`` (``OUT.tmp-PID-HEX``, ``OUT.old-PID-HEX``)."""
    return name.startswith(target.name) and _TMP_NAME.fullmatch(name[len(target.name):]) is not None


def _remove_own(path: Path) -> bool:
    """Delete ``path`` only when it is provably this user's weightsmith folder: a real folder (no link), owned
    by this user, holding the output marker or nothing at all. Returns whether it was removed."""
    try:
        st = os.lstat(path)
        if not stat.S_ISDIR(st.st_mode) or st.st_uid != os.getuid():
            return False
        if not written_by_weightsmith(path) and any(path.iterdir()):
            return False
    except OSError:
        return False
    shutil.rmtree(path, ignore_errors=True)
    return True


def _lock_dir(target: Path) -> Path:
    """OUT's private lock folder, beside OUT (so two runs agree on it whatever their temp dirs): it holds the
    lock file and, during a journalled replace, the journal; created 0700 and refused unless this user's."""
    return target.parent / f".{target.name}{LOCK_MARK}"


def _open_lock_dir(target: Path) -> int:
    """An fd of OUT's lock folder, created if absent; refused unless it is a real folder of this user's that no
    one else can write (names inside it are then opened relative to this fd, without following links)."""
    path = _lock_dir(target)
    try:
        os.mkdir(path, 0o700)
    except FileExistsError:
        pass
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW)
    st = os.fstat(fd)
    if st.st_uid != os.getuid() or st.st_mode & 0o077:
        os.close(fd)
        raise WeightsmithError(f"cannot lock {target}: {path} is not a private folder of this user (owner or "
                               "permissions); remove it and rerun")
    return fd


def _journal(target: Path) -> Path:
    return _lock_dir(target) / "replace.json"


def _write_error(target: Path, exc: OSError) -> WeightsmithError:
    hint = ("free space on that disk or choose another folder with -o" if exc.errno in (errno.ENOSPC, errno.EDQUOT)
            else "choose a writable folder with -o")
    return WeightsmithError(f"cannot write {target}: {exc.strerror or exc}; {hint}")


def _is_write_error(exc: OSError, tmp: Path) -> bool:
    if exc.errno in (errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EFBIG):
        return True
    return exc.errno in _WRITE_ERRNOS and exc.filename is not None and \
        (Path(exc.filename) == tmp or tmp in Path(exc.filename).parents)


def _lock(target: Path, created: list[Path]) -> None:
    """Take OUT's lock file (flock, not waiting): a second run to OUT fails at once, naming the holder's pid."""
    key = target.resolve()
    if key in _LOCKS:
        return
    while True:
        try:
            dfd = _open_lock_dir(target)
            fd = os.open("lock", os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW, 0o600, dir_fd=dfd)
        except FileNotFoundError:  # the folder was removed by the previous holder meanwhile
            continue
        except OSError as exc:
            raise WeightsmithError(f"cannot lock {target}: {exc.strerror} ({_lock_dir(target)})") from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 32, 0).decode(errors="replace").strip() or "?"
            os.close(fd)
            os.close(dfd)
            raise WeightsmithError(f"{target} is being written by another weightsmith run (pid {holder}); "
                                   "wait for it to finish or choose another output folder") from None
        try:
            same = os.fstat(fd).st_ino == os.stat("lock", dir_fd=dfd, follow_symlinks=False).st_ino
        except FileNotFoundError:
            same = False
        if same:  # not unlinked by the previous holder between our open and our flock
            break
        os.close(fd)
        os.close(dfd)
    try:
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
    except OSError as exc:
        os.close(fd)
        os.close(dfd)
        raise WeightsmithError(f"cannot lock {target}: {exc.strerror} ({_lock_dir(target)})") from None
    _LOCKS[key] = (fd, dfd, target, created)


def _make_parents(target: Path) -> list[Path]:
    """Create the missing folders above ``target`` (its lock folder goes beside it); returns them, outermost first."""
    missing = []
    folder = target.parent
    while not (folder.exists() or folder.is_symlink()):
        missing.append(folder)
        folder = folder.parent
    missing.reverse()
    for p in missing:
        try:
            p.mkdir(exist_ok=True)
        except OSError as exc:
            raise _write_error(target, exc) from None
    return missing


def _remove_empty(folders: list[Path]) -> None:
    for p in reversed(folders):
        try:
            p.rmdir()
        except OSError:
            return


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
    held = _LOCKS.pop(target.resolve(), None)
    if held is None:
        return
    fd, dfd, target, created = held
    try:
        os.unlink("lock", dir_fd=dfd)
        os.rmdir(_lock_dir(target))  # not empty while a journal waits for the next run
    except OSError:
        pass
    os.close(fd)
    os.close(dfd)
    _remove_empty(created)  # the folders made for an output that was never written


@atexit.register
def release_locks() -> None:
    """Release every output lock this process holds (at exit, and when the command line stops on a signal)."""
    for held in list(_LOCKS.values()):
        _unlock(held[2])


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
        if m and not _pid_alive(int(m.group(1))):
            _remove_own(p)


def _read_journal(target: Path) -> tuple[Path, Path] | None:
    """The (new, old) folders of a replace a killed run left half done; None unless the journal is a regular
    file in OUT's private lock folder naming two folders of the kind this module generates."""
    dfd = _LOCKS[target.resolve()][1]
    try:
        fd = os.open("replace.json", os.O_RDONLY | os.O_NOFOLLOW, dir_fd=dfd)
    except OSError:
        return None
    try:
        with os.fdopen(fd) as f:
            names = json.load(f)
        new, old = names["new"], names["old"]
    except (OSError, ValueError, KeyError, TypeError):
        new = old = ""
    os.unlink("replace.json", dir_fd=dfd)
    if not (isinstance(new, str) and isinstance(old, str) and _own_name(target, new) and _own_name(target, old)):
        return None
    return target.parent / new, target.parent / old


def _recover(target: Path) -> None:
    """Finish a journalled replace that a killed run left half done (lock held)."""
    found = _read_journal(target)
    if found is None:
        return
    new, old = found
    if new.is_dir() and not new.is_symlink() and written_by_weightsmith(new):
        if target.exists() and not old.exists() and written_by_weightsmith(target):
            target.rename(old)
        if not target.exists():
            new.rename(target)
    _remove_own(old)


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


def _keep_result(tmp: Path, target: Path) -> Path:
    kept = target.parent / f"{target.name}.result-{uuid.uuid4().hex[:8]}"
    tmp.rename(kept)
    return kept


def _commit(tmp: Path, target: Path, force: bool) -> None:
    if target.exists() or target.is_symlink():
        if not force:  # appeared while this run computed (not through weightsmith, which holds the lock)
            kept = _keep_result(tmp, target)
            raise needs_option(f"{target} appeared while this run was writing it; nothing was replaced, the result "
                               f"is in {kept}", " ({0} replaces it)", "force")
        if target.is_symlink() or not target.is_dir():
            raise WeightsmithError(f"{target} was replaced by a file or link while this run was writing it")
        if not written_by_weightsmith(target):
            raise WeightsmithError(f"{target} was replaced by a folder weightsmith did not write while this run was "
                                   f"writing it; nothing was replaced, the result is in {_keep_result(tmp, target)}")
        if _renameat2(tmp, target, _RENAME_EXCHANGE):
            _remove_own(tmp)  # now the old folder; a kill here leaves a stale, cleaned tmp
            return
        old = target.parent / f"{target.name}{OLD_MARK}{os.getpid()}-{uuid.uuid4().hex[:8]}"
        dfd = _LOCKS[target.resolve()][1]
        fd = os.open("replace.json", os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW, 0o600, dir_fd=dfd)
        with os.fdopen(fd, "w") as f:
            json.dump({"new": tmp.name, "old": old.name}, f)
            f.flush()
            os.fsync(f.fileno())
        target.rename(old)
        tmp.rename(target)
        _remove_own(old)
        os.unlink("replace.json", dir_fd=dfd)
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
        check_publishable(self.folder, name, tensor)
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
    """config.json; a weightsmith format that stock loaders would get wrong is written under its own model type
    (``formats.written_config``)."""
    (Path(folder) / "config.json").write_text(json.dumps(written_config(config), indent=2, sort_keys=True) + "\n")


def copy_side_files(src: str | Path, folder: Path) -> list[str]:
    """Copy tokenizer / generation files (not config.json, not weights) from ``src``."""
    copied = []
    for name in SIDE_FILES:
        p = Path(src) / name
        if p.is_file():
            shutil.copy2(p, Path(folder) / name)
            copied.append(name)
    return copied
