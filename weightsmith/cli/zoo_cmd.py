from __future__ import annotations

from typing import Annotated

import typer

from . import app
from .common import JsonOpt, QuietOpt, Table, console, print_json, progress_bars

zoo_app = typer.Typer(help="The in-house model zoo trained on Python's own text (cached).", no_args_is_help=True)
app.add_typer(zoo_app, name="zoo")

SizeOpt = Annotated[str, typer.Option("--size", help="tiny (tests, ~4 min to build) or small (demo, bench).")]


def _describe(zoo) -> dict:
    return {"root": str(zoo.root), "size": zoo.size, "tokenizer": str(zoo.tokenizer),
            "models": {n: str(zoo.root / "models" / n) for n in zoo.model_names()},
            "mwa_checkpoints": [str(p) for p in zoo.mwa_checkpoints],
            "data": {p.stem: str(p) for p in sorted((zoo.root / "data").glob("*.txt"))},
            "build_seconds": zoo.manifest.get("build_seconds")}


@zoo_app.command("build")
def build_cmd(size: SizeOpt = "tiny", force: Annotated[bool, typer.Option("--force", help="Rebuild even if cached.")] = False,
              json_out: JsonOpt = False, quiet: QuietOpt = False) -> None:
    """Build (or reuse) the zoo and print where everything is."""
    from ..zoo import build

    with progress_bars(not quiet) as progress:
        zoo = build(size, progress=progress, force=force)
    info = _describe(zoo)
    if json_out:
        print_json(info)
        return
    table = Table("name", "path", title=f"zoo {size} (built in {info['build_seconds']} s)", title_justify="left")
    for name, path in info["models"].items():
        table.add_row(name, path)
    if info["mwa_checkpoints"]:
        table.add_row(f"mwa ({len(info['mwa_checkpoints'])} checkpoints)", str(zoo.root / "models" / "mwa"))
    for name, path in info["data"].items():
        table.add_row(f"data {name}", path)
    console.print(table)


@zoo_app.command("path")
def path_cmd(size: SizeOpt = "tiny", name: Annotated[str | None, typer.Argument(help="Model name, or data:DOMAIN.SPLIT.")] = None) -> None:
    """Print the folder of the cached zoo (or of one model in it); fails if it is not built."""
    from ..errors import WeightsmithError
    from ..zoo import Zoo, zoo_path

    root = zoo_path(size)
    if not (root / "zoo.json").exists():
        raise WeightsmithError(f"the {size} zoo is not built yet; run: weightsmith zoo build --size {size}")
    zoo = Zoo(root, size)
    if name is None:
        print(root)
    elif name.startswith("data:"):
        domain, _, split = name[5:].partition(".")
        print(zoo.data(domain, split or "valid"))
    else:
        print(zoo.model(name))
