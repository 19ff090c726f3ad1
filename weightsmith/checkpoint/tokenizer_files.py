"""A folder's tokenizer, opened through the loading gate: ``tokenizer.json`` is read inside the folder, its nesting
bounded and every regex it holds checked (``patterns``) before transformers or the Rust tokenizers library parse it,
and anything either library then refuses is one line."""
from __future__ import annotations

import json
from pathlib import Path

from ..errors import WeightsmithError
from .formats import loads_stock, read_config
from .patterns import check_pattern
from .files import member, read_json, read_regular

TOKENIZER_JSON = "tokenizer.json"
MAX_DEPTH = 100  # the Rust tokenizers parser stops at 128 levels; real files use under 10


def _regexes(data, path: Path) -> list[str]:
    """Every ``{"Regex": pattern}`` in ``data`` (split and replace rules), refusing nesting past ``MAX_DEPTH``."""
    found, stack = [], [(data, 0)]
    while stack:
        value, depth = stack.pop()
        if depth > MAX_DEPTH:
            raise WeightsmithError(f"{path}: nests JSON more than {MAX_DEPTH} levels deep; not a real tokenizer file")
        if isinstance(value, dict):
            if "Regex" in value:
                found.append(value["Regex"])
            stack += [(v, depth + 1) for v in value.values()]
        elif isinstance(value, list):
            stack += [(v, depth + 1) for v in value]
    return found


_checked: set[tuple] = set()  # (file, size, mtime) of tokenizer files that passed: a folder is opened many times
# The other JSON files transformers parses when it loads a tokenizer: they must parse (Python's parser, as
# transformers uses it), so a file nested past its recursion limit is refused when the folder is opened.
OTHER_JSON = ("tokenizer_config.json", "special_tokens_map.json", "added_tokens.json")


def check_tokenizer_files(folder: str | Path) -> None:
    """Refuse tokenizer files outside the folder, JSON that does not parse or nests too deeply, and a
    ``tokenizer.json`` holding a bad or catastrophic regex."""
    folder = Path(folder)
    for name in (TOKENIZER_JSON, *OTHER_JSON):
        path = member(folder, name, folder)
        if not path.is_file():
            continue
        st = path.stat()
        key = (str(path.resolve()), st.st_size, st.st_mtime_ns)
        if key not in _checked:
            _check_json(path, name)
            _checked.add(key)


def _check_json(path: Path, name: str) -> None:
    if name != TOKENIZER_JSON:
        try:
            json.loads(read_regular(path))
        except RecursionError:
            raise WeightsmithError(f"{path}: nests JSON too deeply to be a real {name}") from None
        except ValueError as exc:  # also UnicodeDecodeError
            raise WeightsmithError(f"{path}: not valid JSON ({' '.join(str(exc).split())[:120]})") from None
        return
    patterns = _regexes(read_json(path, TOKENIZER_JSON), path)
    if patterns:
        from tokenizers import Regex

        for pattern in patterns:
            check_pattern(pattern, f"{path}: regex", compile_with=Regex)


def load_tokenizer(folder: str | Path, trust_remote_code: bool = False, **kwargs):
    """The transformers tokenizer of ``folder`` after the checks above; a file that transformers or tokenizers
    cannot parse is one ``WeightsmithError`` naming the folder."""
    from transformers import AutoTokenizer

    check_tokenizer_files(folder)
    config = read_config(folder) if "config" not in kwargs and (Path(folder) / "config.json").is_file() else None
    try:
        if config is not None and not loads_stock(config):
            # transformers would read the folder's own model type, which names no tokenizer: the stock config
            from .exact import config_object

            kwargs["config"] = config_object(config)
        return AutoTokenizer.from_pretrained(str(folder), trust_remote_code=trust_remote_code, **kwargs)
    except RecursionError:
        raise WeightsmithError(f"{folder}: a tokenizer file nests too deeply to be real") from None
    except Exception as exc:  # noqa: BLE001 - transformers and tokenizers raise many kinds for a bad file
        detail = " ".join(str(exc).split())[:200] or "no detail"
        raise WeightsmithError(f"{folder}: no tokenizer could be loaded ({type(exc).__name__}: {detail})") from None
