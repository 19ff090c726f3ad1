"""A folder's tokenizer, opened through the loading gate: ``tokenizer.json`` is read inside the folder, its nesting
bounded and every regex it holds checked (``patterns``) before transformers or the Rust tokenizers library parse it,
and anything either library then refuses is one line."""
from __future__ import annotations

from pathlib import Path

from ..errors import WeightsmithError
from .patterns import check_pattern
from .reader import member, read_json

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


def check_tokenizer_files(folder: str | Path) -> None:
    """Refuse a ``tokenizer.json`` outside the folder, nested too deeply or holding a bad or catastrophic regex."""
    folder = Path(folder)
    path = member(folder, TOKENIZER_JSON, folder)
    if not path.is_file():
        return
    st = path.stat()
    key = (str(path.resolve()), st.st_size, st.st_mtime_ns)
    if key in _checked:
        return
    patterns = _regexes(read_json(path, TOKENIZER_JSON), path)
    if patterns:
        from tokenizers import Regex

        for pattern in patterns:
            check_pattern(pattern, f"{path}: regex", compile_with=Regex)
    _checked.add(key)


def load_tokenizer(folder: str | Path, trust_remote_code: bool = False, **kwargs):
    """The transformers tokenizer of ``folder`` after the checks above; a file that transformers or tokenizers
    cannot parse is one ``WeightsmithError`` naming the folder."""
    from transformers import AutoTokenizer

    check_tokenizer_files(folder)
    try:
        return AutoTokenizer.from_pretrained(str(folder), trust_remote_code=trust_remote_code, **kwargs)
    except RecursionError:
        raise WeightsmithError(f"{folder}: a tokenizer file nests too deeply to be real") from None
    except Exception as exc:  # noqa: BLE001 - transformers and tokenizers raise many kinds for a bad file
        detail = " ".join(str(exc).split())[:200] or "no detail"
        raise WeightsmithError(f"{folder}: no tokenizer could be loaded ({type(exc).__name__}: {detail})") from None
