"""User-written text files (recipes, pipelines) and the YAML in them and in model cards: read as UTF-8 up to a
size limit, YAML parsed with its aliases counted before anything is built, any failure one clear line."""
from __future__ import annotations

from pathlib import Path

import yaml

from ..errors import WeightsmithError

MAX_TEXT_FILE = 256 * 1024  # bytes: real recipes and pipelines are a few KB; parsing this much takes ~1 s
# Values a YAML document may expand to, aliases counted as often as they are used: a few KB of anchors can
# otherwise name billions of values, built and walked by whatever reads the document next.
MAX_YAML_VALUES = 100_000


def read_text_file(path: str | Path, what: str) -> str:
    """The text of ``path``; ``what`` names the file in errors ('recipe', 'pipeline file')."""
    path = Path(path)
    try:
        with open(path, "rb") as f:
            raw = f.read(MAX_TEXT_FILE + 1)
        if len(raw) > MAX_TEXT_FILE:
            raise WeightsmithError(f"{path}: larger than {MAX_TEXT_FILE // 1024} KB; not a {what} weightsmith "
                                   "reads (real ones are a few KB)")
        return raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise WeightsmithError(f"{path}: not UTF-8 text (byte {exc.start}); save the {what} as UTF-8") from None
    except OSError as exc:
        raise WeightsmithError(f"{path}: cannot read the {what} ({exc.strerror})") from None


class YAMLTooLarge(yaml.YAMLError):
    """A document that expands past ``MAX_YAML_VALUES`` or nests past Python's recursion limit: refused as any
    YAML error is, before a value is built."""


def load_yaml(text: str):
    """``yaml.safe_load(text)``, refusing (``YAMLTooLarge``) a document whose values, aliases expanded, number
    more than ``MAX_YAML_VALUES``: the node graph is composed (aliases stay shared there) and counted first."""
    loader = getattr(yaml, "CSafeLoader", yaml.SafeLoader)(text)
    try:
        node = loader.get_single_node()
        if node is None:
            return None
        if _expanded(node, {}) > MAX_YAML_VALUES:
            raise YAMLTooLarge(f"expands to more than {MAX_YAML_VALUES:,} values (aliases counted each time they "
                               "are used)")
        return loader.construct_document(node)
    except RecursionError:
        raise YAMLTooLarge("nested too deeply") from None
    finally:
        loader.dispose()


def _expanded(node: yaml.Node, seen: dict[int, int]) -> int:
    """How many values ``node`` stands for once every alias is replaced by what it names (memoised per node, so
    counting costs one visit per node however often it is aliased)."""
    if id(node) in seen:
        return seen[id(node)]
    seen[id(node)] = MAX_YAML_VALUES + 1  # a node met again while being counted aliases itself: unbounded
    if isinstance(node, yaml.SequenceNode):
        total = 1 + sum(_expanded(child, seen) for child in node.value)
    elif isinstance(node, yaml.MappingNode):
        total = 1 + sum(_expanded(k, seen) + _expanded(v, seen) for k, v in node.value)
    else:
        total = 1
    seen[id(node)] = min(total, MAX_YAML_VALUES + 1)
    return seen[id(node)]
