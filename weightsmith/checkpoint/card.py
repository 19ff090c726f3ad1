"""Model cards: every output folder gets a README.md with Hub metadata, what was done, and metrics."""
from __future__ import annotations

import json
import re
from pathlib import Path

import yaml

from .textfile import load_yaml
from .writer import write_file_atomic

HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")


def hub_ids(inputs: list[str], read_inputs: bool = True) -> list[str]:
    """The Hub repos the inputs came from: a folder a Hub reference resolved to (``sources.pinned``), or an input
    written as a repo id that is not a local folder (with ``read_inputs`` False, any input written as a repo id)."""
    from .sources import pinned

    found = []
    for i in inputs:
        if not read_inputs:
            found += [str(i).partition("@")[0]] if HUB_ID.match(str(i)) else []
            continue
        pin = pinned(i) if Path(str(i)).exists() else None
        if pin:
            found += [part.partition("@")[0] for part in pin.split("+")]
        elif HUB_ID.match(str(i)) and not Path(str(i)).exists():
            found.append(str(i).partition("@")[0])
    return found


def _shown(i: str, read_inputs: bool = True) -> str:
    """An input as the card names it: ``org/name@commit`` for a Hub input, else the path as given."""
    from .sources import pinned

    return (pinned(i) if read_inputs and Path(str(i)).exists() else None) or str(i)


CARD_HEAD = 64 * 1024  # bytes of an input's README read for its front matter


def _source_base_models(inputs: list[str]) -> tuple[list[str], list[str]]:
    """base_model entries carried over from the inputs' own cards, so lineage survives local paths, and a note for
    each card that could not be read (outside the folder, not a file, not UTF-8, broken or oversized front
    matter): a side file never costs the finished output."""
    from ..errors import WeightsmithError
    from .files import member, read_regular

    found, notes = [], []
    for i in inputs:
        try:
            card = member(Path(str(i)), "README.md", Path(str(i)))
            if not card.is_file():
                continue
            head = read_regular(card, CARD_HEAD)
            head = (head if len(head) < CARD_HEAD else head[:head.rfind(b"\n") + 1]).decode("utf-8")
            m = re.match(r"^---\r?\n(.*?)\r?\n---", head, re.S)
            meta = load_yaml(m.group(1)) if m else None
        except (WeightsmithError, OSError, UnicodeDecodeError, yaml.YAMLError) as exc:
            why = ("it is not a regular file inside the folder" if isinstance(exc, WeightsmithError) else
                   "it is not UTF-8" if isinstance(exc, UnicodeDecodeError) else
                   "its front matter is not YAML weightsmith reads" if isinstance(exc, yaml.YAMLError) else
                   "it cannot be read")
            notes.append(f"The model card (README.md) of input `{i}` was not used: {why}.")
            continue
        base = meta.get("base_model") if isinstance(meta, dict) else None
        base = [base] if isinstance(base, str) else base if isinstance(base, list) else []
        found += [b for b in base if isinstance(b, str) and HUB_ID.match(b)]
    return found, notes


def pinned_recipe(text: str) -> str:
    """The recipe with every Hub reference it names pinned to the commit this run read (``org/name@sha``), so
    running it again reads the same bytes; unchanged (comments kept) when it names none."""
    from .sources import pinned_text

    def pin(value):
        if isinstance(value, dict):
            return {k: pin(v) for k, v in value.items()}
        if isinstance(value, list):
            return [pin(v) for v in value]
        return pinned_text(value) or value if isinstance(value, str) else value

    try:
        data = load_yaml(text)
    except yaml.YAMLError:
        return text
    pinned_data = pin(data)
    return text if pinned_data == data else yaml.safe_dump(pinned_data, sort_keys=False)


def own_format(folder: Path) -> str | None:
    """The weightsmith format of a folder whose config.json (written first) stock loaders refuse, else None."""
    from .formats import loads_stock, read_config

    if not (folder / "config.json").is_file():
        return None
    config = read_config(folder)
    return None if loads_stock(config) else config["weightsmith"]["format"]


def write_model_card(folder: str | Path, *, stage: str, method: str, inputs: list[str], parameters: dict,
                     metrics: list[dict] | None = None, recipe: str | None = None, notes: str | None = None,
                     tags: list[str] | None = None, read_inputs: bool = True) -> Path:
    """Write README.md (and the recipe beside it, when given) into ``folder``. ``read_inputs`` False: the inputs
    are names only (not folders the stage read), so nothing is read from disk for them."""
    folder = Path(folder)
    inputs = [str(i) for i in inputs]
    own, unread = _source_base_models(inputs) if read_inputs else ([], [])
    bases = list(dict.fromkeys(hub_ids(inputs, read_inputs) + own))
    fmt = own_format(folder)
    meta: dict = {"library_name": "weightsmith" if fmt else "transformers",
                  "tags": ["weightsmith", stage, method, *(tags or [])]}
    if bases:
        meta["base_model"] = bases
        if stage == "merge":
            meta["base_model_relation"] = "merge"
    lines = ["---", yaml.safe_dump(meta, sort_keys=False).strip(), "---", "",
             f"# {folder.name.split('.tmp-')[0]}", "",
             f"Made with weightsmith `{stage}` using **{method}**.", ""]
    for note in [notes, *unread]:
        lines += [note, ""] if note else []
    lines += ["## Inputs", ""] + [f"- `{_shown(i, read_inputs)}`" for i in inputs] + [""]
    lines += ["## Parameters", "", "```json", json.dumps(parameters, indent=2, sort_keys=True, default=str), "```", ""]
    if metrics:
        lines += _metrics_section(metrics)
    if recipe:
        recipe = pinned_recipe(recipe)
        (folder / "weightsmith_recipe.yaml").write_text(recipe)
        lines += ["## Recipe", "", "```yaml", recipe.strip(), "```", ""]
    name = folder.name.split('.tmp-')[0]
    lines += ["## Loading", "", "```python", "import weightsmith", f"model = weightsmith.load(\"{name}\")", "```", ""]
    if fmt:
        lines += [f"This is not a stock checkpoint: its weights are stored in weightsmith's {fmt} format, which "
                  "transformers and sentence-transformers refuse. `weightsmith export --plain "
                  f"{name} -o {name}-plain` writes one they load.", ""]
    path = folder / "README.md"
    path.write_text("\n".join(lines))
    return path


def _metrics_section(metrics: list[dict]) -> list[str]:
    keys = list(dict.fromkeys(k for row in metrics for k in row if k != "model"))
    keys = [k for k in keys if any(row.get(k) is not None for row in metrics)]
    lines = ["## Evaluation", "", "| model | " + " | ".join(keys) + " |", "|---" * (len(keys) + 1) + "|"]
    for row in metrics:
        lines.append(f"| {row.get('model', '')} | " + " | ".join(_fmt(row.get(k)) for k in keys) + " |")
    return lines + [""]


def add_metrics(folder: str | Path, metrics: list[dict]) -> Path:
    """Replace (or add) the Evaluation table of the README.md model card in ``folder``."""
    path = Path(folder) / "README.md"
    text = path.read_text()
    section = "\n".join(_metrics_section(metrics))
    start = text.find("\n## Evaluation\n")
    if start >= 0:
        end = text.find("\n## ", start + 1)
        text = text[:start + 1] + section + (text[end + 1:] if end >= 0 else "")
    else:
        anchor = min((i for i in (text.find("\n## Recipe\n"), text.find("\n## Loading\n")) if i >= 0),
                     default=len(text))
        text = text[:anchor + 1] + section + text[anchor + 1:] if anchor < len(text) else text + "\n" + section
    write_file_atomic(path, text)  # the card of a finished output: never left half written
    return path


def _fmt(v) -> str:
    if isinstance(v, float):
        return f"{v:.4g}"
    return "" if v is None else str(v)
