"""The docs say what the code does: the method table is the registry's, and every module the architecture
page names exists."""
from __future__ import annotations

import re
from pathlib import Path

import weightsmith
from weightsmith.merge import all_methods

ROOT = Path(weightsmith.__file__).resolve().parent.parent


def test_the_method_table_in_docs_is_the_registry():
    text = (ROOT / "docs" / "merge.md").read_text()
    table = text[text.index("## Methods"):text.index("## How merge runs")]
    listed = re.findall(r"^\| `([a-z_]+)` \|", table, flags=re.M)
    assert listed == sorted(all_methods()), "regenerate the table in docs/merge.md from all_methods()"
    for name, method in all_methods().items():
        row = next(line for line in table.splitlines() if line.startswith(f"| `{name}` |"))
        assert all(f"`{p['name']}`" in row for p in method.describe()["params"]), name


def test_every_module_the_architecture_page_names_exists():
    text = (ROOT / "docs" / "ARCHITECTURE.md").read_text()
    package = ROOT / "weightsmith"
    named = set(re.findall(r"`((?:[a-z_]+/)*[a-z_]+\.py)`", text))
    assert named, "the page names no module"

    def exists(name: str) -> bool:
        if name.startswith("tests/"):
            return (ROOT / name).is_file()
        if "/" in name:  # a path from the package root, or from one of its packages
            return (package / name).is_file() or any(package.glob(f"*/{name}"))
        return any(package.rglob(name))
    missing = [n for n in sorted(named) if not exists(n)]
    assert not missing, f"docs/ARCHITECTURE.md names modules that do not exist: {missing}"


def test_the_readme_links_only_to_docs_that_exist():
    text = (ROOT / "README.md").read_text()
    for target in re.findall(r"\]\((docs/[^)#]+|SECURITY\.md)", text):
        assert (ROOT / target).is_file(), target
