"""Shared CLI pieces: option types with defaults, the console writer, rich progress bars, JSON output."""
from __future__ import annotations

import json
import sys
from contextlib import contextmanager
from pathlib import Path
from typing import Annotated, Any

import typer
import rich.table
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn
from rich.text import Text

from ..options import Options, option
from .options import annotated

# C0/C1 control characters (tab and newline aside) and the bidirectional overrides that can reorder a line.
_CONTROLS = {c: f"\\x{c:02x}" for c in [*range(0x20), *range(0x7f, 0xa0)] if c not in (0x09, 0x0a)}
_CONTROLS.update({c: f"\\u{c:04x}" for c in [*range(0x202a, 0x202f), *range(0x2066, 0x206a)]})


def shown(text: str) -> str:
    """``text`` safe for a terminal: every control character written as its escape (``\\x1b``)."""
    return str(text).translate(_CONTROLS)


class TextConsole(Console):
    """The one console writer: text (tensor names, paths, messages, folder text) is shown as it is, never read as
    rich markup or emoji codes, with control characters escaped. Styling is given as ``rich.text.Text`` parts."""

    def __init__(self, **kwargs):
        super().__init__(markup=False, emoji=False, **kwargs)

    def render_str(self, text: str, **kwargs) -> Text:
        kwargs.update(markup=False, emoji=False)
        return super().render_str(shown(text), **kwargs)


def styled(*parts: str | tuple[str, str]) -> Text:
    """One line from plain parts and ``(text, style)`` parts, every part shown as it is (``shown``)."""
    return Text.assemble(*[(shown(p[0]), p[1]) if isinstance(p, tuple) else shown(p) for p in parts])


class Table(rich.table.Table):
    """Every command's table: a cell too wide for the terminal folds onto more lines (a long path or model name
    stays whole and can be copied), instead of rich's default of cutting it with an ellipsis."""

    def add_column(self, *args, overflow: str = "fold", **kwargs) -> None:
        super().add_column(*args, overflow=overflow, **kwargs)


err_console = TextConsole(stderr=True)
console = TextConsole()



class RunFlags(Options):
    """The flags the commands share, declared once: a command takes those it names
    (``@with_options(RunFlags, "run", only=(...))``), or one as a Typer annotation (``DeviceOpt``)."""
    device: str = option("auto", pipeline=False, help="auto, cpu, cuda or cuda:N.")
    seed: int = option(0, lo=0, hi=2**32 - 1, pipeline=False, help="Random seed; same seed, same output.")
    force: bool = option(False, pipeline=False, help="Replace OUT if it already exists.")
    json_out: bool = option(False, pipeline=False, flag="--json", help="Print machine-readable JSON on stdout instead "
                                                                       "of a table.")
    quiet: bool = option(False, pipeline=False, short="-q", help="No progress bars.")
    allow_pickle: bool = option(False, pipeline=False, help="Allow loading .bin (pickle) weights; runs code from the "
                                                            "file.")
    trust_remote_code: bool = option(False, pipeline=False, help="Allow a folder's own Python code (config auto_map) "
                                                                 "to run; refused otherwise.")
    offline: bool = option(False, pipeline=False, help="Never reach the Hub: Hub model names resolve from the Hugging "
                                                       "Face cache only (as HF_HUB_OFFLINE=1).")


DeviceOpt = annotated(RunFlags, "device")
SeedOpt = annotated(RunFlags, "seed")
JsonOpt = annotated(RunFlags, "json_out")
ForceOpt = annotated(RunFlags, "force")
PickleOpt = annotated(RunFlags, "allow_pickle")
TrustCodeOpt = annotated(RunFlags, "trust_remote_code")
QuietOpt = annotated(RunFlags, "quiet")
OfflineOpt = annotated(RunFlags, "offline")
OutOpt = Annotated[Path, typer.Option("--out", "-o", help="Output folder (written atomically).")]
ShardOpt = Annotated[str, typer.Option("--out-shard-size", help="Largest output shard, e.g. 2GB or 500MB.")]
DtypeOpt = Annotated[str | None, typer.Option("--dtype", help="Output dtype: float32, bfloat16 or float16 (default: as input).")]


def go_offline(offline: bool) -> None:
    """``--offline``: the user's own no-network choice, as ``HF_HUB_OFFLINE=1`` would be."""
    import os

    if offline:
        os.environ["HF_HUB_OFFLINE"] = "1"
        os.environ.pop("WEIGHTSMITH_OFFLINE_BY_DEFAULT", None)


def model_folder(ref: Path | str, run: RunFlags | None = None, allow_pickle: bool = False) -> Path:
    """The folder of a model argument: a local folder, a cache snapshot, ``org/name[@rev]`` or ``model+adapter``
    (``checkpoint.sources``), after ``--offline``."""
    from ..checkpoint.sources import resolve_model

    if run is not None:
        go_offline(run.offline)
        if run.quiet:
            quiet_hub()
    return resolve_model(ref, allow_pickle=allow_pickle or bool(run is not None and run.allow_pickle))


def quiet_hub() -> None:
    """No huggingface_hub bars either (its downloads and uploads draw their own on stderr)."""
    from huggingface_hub.utils import disable_progress_bars

    disable_progress_bars()


def with_tokenizer(opts, run: RunFlags):
    """``opts`` with the model references among its options (``--tokenizer``, ``--reference``) resolved to folders."""
    from dataclasses import replace

    named = {k: getattr(opts, k, None) for k in ("tokenizer", "reference")}
    return replace(opts, **{k: model_folder(v, run) for k, v in named.items() if v is not None})


@contextmanager
def progress_bars(enabled: bool = True):
    """Yield a ``progress(label, done, total)`` callback drawing one rich bar per label (stderr); when stderr is not a
    terminal (CI, nohup, a log file), plain lines for long work instead (``plain_progress``)."""
    import os

    if not enabled or os.environ.get("WEIGHTSMITH_PROGRESS") == "0":
        quiet_hub()
        yield None
        return
    if not err_console.is_terminal and not _force_bars():
        yield plain_progress()
        return
    bars = Progress(TextColumn("{task.description}", markup=False), BarColumn(), MofNCompleteColumn(),
                    TimeElapsedColumn(), TimeRemainingColumn(), console=err_console, transient=True)
    tasks: dict[str, Any] = {}

    def callback(label: str, done: int, total: int | None) -> None:
        if label not in tasks:
            tasks[label] = bars.add_task(shown(label), total=total)
        bars.update(tasks[label], completed=done, total=total)

    with bars:
        yield callback


def plain_progress(every: float | None = None, clock=None, write=None):
    """A progress callback for logs: a line ``label: done/total (elapsed)`` for a step once it has run ``every``
    seconds (``WEIGHTSMITH_PROGRESS_EVERY``, default 30), then every ``every`` seconds, and when such a step ends;
    steps shorter than that print nothing."""
    import os
    import time

    every = float(os.environ.get("WEIGHTSMITH_PROGRESS_EVERY", 30)) if every is None else every
    clock = clock or time.monotonic
    write = write or (lambda line: err_console.print(line, markup=False, highlight=False, soft_wrap=True))
    started: dict[str, float] = {}
    shown: dict[str, float] = {}

    def callback(label: str, done: int, total: int | None) -> None:
        now = clock()
        start = started.setdefault(label, now)
        finished = total is not None and done >= total
        due = now - shown.get(label, start) >= every
        if due or (finished and label in shown):
            shown[label] = now
            write(f"{label}: {done}/{total if total is not None else '?'} ({now - start:.0f} s)")
    return callback


def _force_bars() -> bool:
    import os
    return os.environ.get("WEIGHTSMITH_PROGRESS") == "1"


def print_json(data: Any) -> None:
    sys.stdout.write(json.dumps(data, indent=2, default=_jsonable) + "\n")


def _jsonable(o: Any) -> Any:
    if isinstance(o, Path):
        return str(o)
    if hasattr(o, "to_dict"):
        return o.to_dict()
    raise TypeError(f"not JSON serialisable: {type(o).__name__}")


def human_bytes(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if abs(n) < 1000 or unit == "TB":
            return f"{n:.1f} {unit}" if unit != "B" else f"{int(n)} B"
        n /= 1000
    return f"{n:.1f} TB"


def human_count(n: float) -> str:
    for unit in ("", "K", "M", "B"):
        if abs(n) < 1000 or unit == "B":
            return f"{n:.2f}{unit}" if unit else str(int(n))
        n /= 1000
    return str(n)


def short_name(path: str, others: list[str]) -> str:
    """The shortest tail of ``path`` (folder name, then parent/name, ...) that tells it apart from ``others``."""
    parts = Path(path).parts
    for k in range(1, len(parts) + 1):
        tail = "/".join(parts[-k:])
        if sum(1 for o in others if "/".join(Path(o).parts[-k:]) == tail) <= 1:
            return tail
    return str(path)
