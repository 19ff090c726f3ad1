"""The layers (cli -> stages -> checkpoint) hold: read from the import statements of every module."""
from __future__ import annotations

import ast
from pathlib import Path

import pytest

import weightsmith

ROOT = Path(weightsmith.__file__).parent


def imports(path: Path) -> set[str]:
    """weightsmith modules that ``path`` imports anywhere (top level or inside functions), as dotted names."""
    module = ".".join(path.relative_to(ROOT.parent).with_suffix("").parts)
    package = module if path.name == "__init__.py" else module.rsplit(".", 1)[0]
    names = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom):
            base = package.split(".")
            if node.level:
                base = base[: len(base) - node.level + 1]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            names.add(target)
            names |= {f"{target}.{a.name}" for a in node.names}
    return {n for n in names if n.startswith("weightsmith")}


def _files(folder: str) -> list[Path]:
    return sorted((ROOT / folder).rglob("*.py")) if folder else sorted(ROOT.glob("*.py"))


def _under(name: str, package: str) -> bool:
    return name == package or name.startswith(package + ".")


@pytest.mark.parametrize("folder, forbidden", [
    ("checkpoint", ["weightsmith.loading", "weightsmith.cli", "weightsmith.pipeline", "weightsmith.merge",
                    "weightsmith.fold", "weightsmith.compressor", "weightsmith.eval", "weightsmith.training"]),
    ("merge", ["weightsmith.cli", "weightsmith.pipeline", "weightsmith.fold"]),
    # accelerations and methods know nothing of recipes being planned and run
    ("merge/native", [f"weightsmith.merge.{m}" for m in ("plan", "execute", "stage", "recipe", "registry")]),
    ("merge/methods", [f"weightsmith.merge.{m}" for m in ("plan", "execute", "stage")]),
    ("compressor", ["weightsmith.cli", "weightsmith.pipeline", "weightsmith.zoo"]),
    ("eval", ["weightsmith.cli", "weightsmith.pipeline"]),
    ("fold", ["weightsmith.cli", "weightsmith.pipeline"]),
    ("zoo", ["weightsmith.cli", "weightsmith.pipeline"]),
])
def test_lower_layers_do_not_import_upper_ones(folder, forbidden):
    bad = [(f.relative_to(ROOT).as_posix(), n) for f in _files(folder) for n in imports(f)
           if any(_under(n, p) for p in forbidden)]
    assert not bad


def test_the_neutral_modules_import_only_errors_progress_and_each_other():
    neutral = ["weightsmith.options", "weightsmith.stage_options", "weightsmith.errors", "weightsmith.progress",
               "weightsmith.training", "weightsmith.data"]
    for name in ("options.py", "stage_options.py", "errors.py", "training.py", "data.py"):
        assert all(any(_under(n, p) for p in neutral) for n in imports(ROOT / name)), name


def _cycle(edges: dict[str, set[str]]) -> list[str] | None:
    """A cycle A -> B -> ... -> A of ``edges``, or None."""
    done: set[str] = set()

    def cycle_from(node: str, path: list[str]) -> list[str] | None:
        if node in path:
            return path[path.index(node):] + [node]
        if node in done:
            return None
        for nxt in sorted(edges.get(node, ())):
            found = cycle_from(nxt, path + [node])
            if found:
                return found
        done.add(node)
        return None
    return next((c for c in (cycle_from(n, []) for n in sorted(edges)) if c), None)


def _module_graph() -> dict[str, set[str]]:
    """weightsmith module -> the weightsmith modules it imports (anywhere in it; a package's own ``__init__``
    chain does not count), as dotted names of modules that exist."""
    mods = {}
    for f in ROOT.rglob("*.py"):
        name = ".".join(f.relative_to(ROOT.parent).with_suffix("").parts).removesuffix(".__init__")
        mods[name] = f
    graph = {}
    for name, f in mods.items():
        targets = set()
        for n in imports(f):
            while n not in mods and "." in n:
                n = n.rsplit(".", 1)[0]  # `from pkg.mod import name` imports pkg.mod
            if n in mods and n != name and not name.startswith(n + "."):
                targets.add(n)
        graph[name] = targets
    return graph


def test_no_import_circle():
    """Modules import each other as a tree (function-level imports included): a circle means one of them
    belongs elsewhere. Reports the first circle found from each module."""
    graph = _module_graph()
    done: set[str] = set()

    def circle_from(node: str, path: list[str]) -> list[str] | None:
        if node in path:
            return path[path.index(node):] + [node]
        if node in done:
            return None
        for nxt in sorted(graph[node]):
            found = circle_from(nxt, path + [node])
            if found:
                return found
        done.add(node)
        return None

    assert [c for c in (circle_from(n, []) for n in sorted(graph)) if c] == []


@pytest.mark.parametrize("module", ["fold/format.py", "compressor/format.py"])
def test_format_modules_sit_below_loading(module):
    """``loading.format_module`` imports the format modules, so they may not import ``loading`` or their stage."""
    stage = "weightsmith." + module.split("/")[0] + ".stage"
    assert not [n for n in imports(ROOT / module) if _under(n, "weightsmith.loading") or _under(n, stage)]
