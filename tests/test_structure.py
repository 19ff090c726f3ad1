"""The package's shape: no function longer than 60 lines, and no error message below the CLI that spells a
command-line flag (the library names parameters; the CLI and the pipeline word them for their users)."""
from __future__ import annotations

import ast
from pathlib import Path

import weightsmith

PACKAGE = Path(weightsmith.__file__).parent
MAX_LINES = 60


def long_functions(root: Path, limit: int = MAX_LINES) -> list[str]:
    """``path:line name (N lines)`` for every function or method of the .py files under ``root`` whose
    definition (decorators aside, docstring and body included) spans more than ``limit`` lines."""
    found = []
    for path in sorted(root.rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                lines = node.end_lineno - node.lineno + 1
                if lines > limit:
                    found.append(f"{path.relative_to(root.parent)}:{node.lineno} {node.name} ({lines} lines)")
    return found


def test_no_function_is_longer_than_60_lines():
    assert long_functions(PACKAGE) == []


def test_the_length_check_finds_a_long_function(tmp_path):
    pkg = tmp_path / "pkg"
    pkg.mkdir()
    fits = "def short():\n" + "    pass\n" * (MAX_LINES - 1)  # 60 lines
    over = "class C:\n    def long(self):\n" + "        pass\n" * MAX_LINES  # 61 lines
    (pkg / "a.py").write_text(fits + over)
    assert long_functions(pkg) == [f"pkg/a.py:{MAX_LINES + 2} long ({MAX_LINES + 1} lines)"]


def _raised_messages(path: Path) -> list[tuple[int, str]]:
    """(line, text) of every string constant inside a ``raise`` statement of ``path``."""
    out = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Raise) and node.exc is not None:
            for sub in ast.walk(node.exc):
                if isinstance(sub, ast.Constant) and isinstance(sub.value, str):
                    out.append((sub.lineno, sub.value))
    return out


# Messages that show a whole command line to run (not an option to set): a launcher's own flags.
COMMAND_LINES = {"fold/ranks.py"}


def test_no_error_below_the_cli_spells_a_flag():
    import re

    flagged = []
    for path in sorted(PACKAGE.rglob("*.py")):
        rel = str(path.relative_to(PACKAGE))
        if rel.startswith("cli/") or rel in COMMAND_LINES:
            continue
        for line, text in _raised_messages(path):
            if re.search(r"(^|[\s(`'\"])--[a-z]", text):
                flagged.append(f"{rel}:{line} {text!r}")
    assert flagged == []


def test_commands_build_tables_through_the_folding_table():
    """cli/common.Table folds long cells; a command importing rich's Table directly would cut them again."""
    import weightsmith.cli as cli_pkg

    folder = Path(cli_pkg.__file__).parent
    assert [f.name for f in folder.glob("*.py") if "rich.table import" in f.read_text() and f.name != "common.py"] == []
