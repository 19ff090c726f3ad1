"""Folder formats weightsmith writes besides plain checkpoints (``config["weightsmith"]["format"]``: folded, rps),
as config files: which format a folder is, and what stock loaders read of it. The code that loads and exports
each format is its stage's ``format`` module, reached through ``weightsmith.loading.format_module``.

A folder that a stock loader would fill with random weights (shared or hashed tensors it does not store) carries
its own ``model_type``, ``architectures`` and ``dtype`` on disk, so transformers and sentence-transformers refuse it
by name; the stock ones are kept in its weightsmith section and put back by every reader (``stock_config``). Its
sentence-transformers files are kept aside in ``ST_ASIDE`` for the same reason.
"""
from __future__ import annotations

import json
import shutil
from pathlib import Path

from ..errors import WeightsmithError
from .files import member, read_json, read_regular

# what a stock loader reads first: the model type (auto classes) and the dtype (a model class named directly)
STOCK_KEYS = ("model_type", "architectures", "dtype", "torch_dtype")
# where a folder that stock loaders refuse keeps its sentence-transformers pipeline (export puts it back)
ST_ASIDE = "weightsmith-sentence-transformers"
ST_FILES = ("modules.json", "sentence_bert_config.json", "config_sentence_transformers.json")


def own_model_type(fmt: str) -> str:
    """What a stock loader reads as the model type: its refusal quotes it, so it says what to do."""
    return f"weightsmith-{fmt} (not a transformers model: load it with weightsmith.load, or make a stock folder " \
           "with weightsmith export --plain)"


def loads_stock(config: dict) -> bool:
    """Whether stock transformers builds this folder's model right from its config and tensors: a plain folder,
    or a fold that shares no block and adds no residual (each kept block stores its own tensors)."""
    ws = config.get("weightsmith") or {}
    fmt = ws.get("format", "plain")
    if fmt == "folded":
        return all(len(g) == 1 for g in ws.get("groups", [])) and not ws.get("relax_rank")
    return fmt == "plain"


def written_config(config: dict) -> dict:
    """``config`` as written to disk: a folder stock loaders would get wrong names its own model type and class,
    the stock ones recorded in its weightsmith section."""
    ws = config.get("weightsmith") or {}
    if loads_stock(config) or "stock" in ws:
        return config
    fmt = ws["format"]
    stock = {k: config[k] for k in STOCK_KEYS if k in config}
    # a model class named directly skips the model type but resolves the dtype: that fails too, quoting it
    dtypes = {k: own_model_type(fmt) for k in ("dtype", "torch_dtype") if k == "dtype" or k in config}
    return {**config, "model_type": own_model_type(fmt), "architectures": [f"Weightsmith{fmt.capitalize()}Model"],
            **dtypes, "weightsmith": {**ws, "stock": stock}}


def stock_config(config: dict) -> dict:
    """``config`` as weightsmith works with it: the stock model type and class a written folder records put back
    (folders written before they were recorded hold them in place)."""
    ws = config.get("weightsmith")
    stock = ws.get("stock") if isinstance(ws, dict) else None
    if not isinstance(stock, dict):
        return config
    out = {k: v for k, v in config.items() if k not in STOCK_KEYS}  # a key the stock config lacks stays absent
    out.update({k: stock[k] for k in STOCK_KEYS if k in stock})
    out["weightsmith"] = {k: v for k, v in ws.items() if k != "stock"}
    return out


def read_config(folder: str | Path) -> dict:
    """A folder's ``config.json`` through the gate, as weightsmith works with it (``stock_config``)."""
    return stock_config(read_json(member(Path(folder), "config.json", folder), "config.json"))


def folder_format(path: str | Path) -> str:
    return (read_config(path).get("weightsmith") or {}).get("format", "plain")


def st_root(folder: str | Path, writing: bool = False) -> Path:
    """Where ``folder`` keeps its sentence-transformers files: aside when stock loaders refuse the folder (a folder
    written before they were kept aside holds them beside its weights, and is read so)."""
    folder = Path(folder)
    if not writing:
        return folder / ST_ASIDE if (folder / ST_ASIDE).is_dir() else folder
    config = folder / "config.json"
    return folder / ST_ASIDE if config.is_file() and not loads_stock(read_config(folder)) else folder


def copy_sentence_transformers_files(src: str | Path, dst: str | Path) -> list[str]:
    """Copy modules.json, the sentence-transformers configs and every module folder but the transformer itself
    (path "") from where ``src`` keeps them to where ``dst`` (its config.json already written) keeps them;
    returns the relative paths copied."""
    src, dst = st_root(src), st_root(dst, writing=True)
    copied = []
    for name in ST_FILES:
        if member(src, name, src).is_file():
            dst.mkdir(exist_ok=True)
            shutil.copy2(src / name, dst / name)
            copied.append(name)
    if not (src / "modules.json").is_file():
        return copied
    try:
        modules = json.loads(read_regular(src / "modules.json"))
    except ValueError as exc:
        raise WeightsmithError(f"{src / 'modules.json'}: not valid JSON ({' '.join(str(exc).split())[:120]})") from None
    for entry in modules if isinstance(modules, list) else []:
        rel = str(entry.get("path", "")) if isinstance(entry, dict) else ""
        if rel and not (src / rel).resolve().is_relative_to(src.resolve()):
            raise WeightsmithError(f"{src / 'modules.json'}: module path {rel!r} points outside the folder")
        if rel and (src / rel).is_dir():
            shutil.copytree(src / rel, dst / rel, dirs_exist_ok=True)
            copied.append(rel)
    return copied
