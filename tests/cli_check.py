"""Helpers for error-path tests through the command line: run it, check a refusal, snapshot a folder, plant a
folder of the user's."""
from __future__ import annotations

import hashlib
import subprocess
import sys
from pathlib import Path


def cli(*args, prefix=(), **kwargs) -> subprocess.CompletedProcess:
    return subprocess.run([*prefix, sys.executable, "-m", "weightsmith", *map(str, args)], capture_output=True,
                          text=True, timeout=300, **kwargs)


def refused(proc: subprocess.CompletedProcess, *words: str) -> str:
    """Exit status 2 and one stderr line starting 'error:' holding every word; no traceback. Returns the line."""
    lines = [ln for ln in proc.stderr.splitlines() if ln.strip()]
    assert proc.returncode == 2, proc.stderr
    assert len(lines) == 1 and lines[0].startswith("error:") and "Traceback" not in proc.stderr, proc.stderr
    for w in words:
        assert w in lines[0], lines[0]
    return lines[0]


def snapshot(folder: Path) -> dict[str, str]:
    """Every path under ``folder`` (hidden ones too) with its content hash."""
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest() if p.is_file() else "dir"
            for p in sorted(Path(folder).rglob("*"))}


def precious(folder: Path) -> Path:
    """A folder of the user's: a project with its own files."""
    (folder / ".git").mkdir(parents=True)
    (folder / ".git" / "HEAD").write_text("ref: refs/heads/main\n")
    (folder / "notes.txt").write_text("mine")
    return folder
