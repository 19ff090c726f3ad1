"""Model references as users write them, resolved to the folder a stage reads.

A reference is a local folder (a Hugging Face cache snapshot folder included), a Hub repo id ``org/name``,
``org/name@revision`` (a branch, tag or commit, as mergekit writes it), or ``model+adapter``: a base with a
peft LoRA adapter applied, either side itself one of the above. ``parse_ref`` reads one; ``resolve_model``
gives the folder: the path itself, the snapshot in the Hugging Face cache, or a download through
huggingface_hub of only the files a stage reads (``HF_HOME``, ``HF_HUB_CACHE``, ``HF_TOKEN``, ``HF_ENDPOINT``
and ``HF_HUB_OFFLINE`` apply, as for transformers). A folder a Hub reference resolved to remembers the commit
it came from (``pinned``), so model cards and written recipes name ``org/name@sha``.
"""
from __future__ import annotations

import os
import re
from dataclasses import dataclass, replace
from pathlib import Path

from ..errors import WeightsmithError, needs_option
from .formats import ST_ASIDE
from .network import (DEFAULT_TIMEOUT, endpoint, http_hint, is_timeout, online, transport_errors,
                      user_offline)

HUB_NAME = re.compile(r"^(?:[A-Za-z0-9][\w.-]{0,95}/)?[A-Za-z0-9][\w.-]{0,95}$")
# What a stage reads from a repo: weights, config, tokenizer, sentence-transformers modules, adapters, cards.
READ_PATTERNS = (
    "*.safetensors", "*.safetensors.index.json", "config.json", "generation_config.json", "tokenizer.json",
    "tokenizer_config.json", "special_tokens_map.json", "added_tokens.json", "vocab.json", "vocab.txt",
    "merges.txt", "tokenizer.model", "*.tiktoken", "chat_template.jinja", "chat_template.json",
    "preprocessor_config.json", "modules.json", "sentence_bert_config.json", "config_sentence_transformers.json",
    "*/config.json", "adapter_config.json", "trainer_state.json", "README.md", f"{ST_ASIDE}/*",
)
PICKLE_PATTERNS = ("pytorch_model*.bin", "pytorch_model.bin.index.json", "adapter_model.bin")
CODE_PATTERNS = ("*.py",)


@dataclass(frozen=True)
class ModelRef:
    """One parsed reference: a local ``path``, or a Hub ``repo_id`` at ``revision``; ``lora`` applied on top."""
    text: str
    path: str | None = None
    repo_id: str | None = None
    revision: str | None = None
    lora: ModelRef | None = None


def _expand(text: str) -> str:
    return os.path.expanduser(os.path.expandvars(text))


def _looks_like_path(text: str) -> bool:
    return (text.startswith(("/", ".", "~", "$")) or text.endswith("/") or text.count("/") > 1
            or (os.sep != "/" and os.sep in text))


def _single(text: str) -> ModelRef:
    expanded = _expand(text)
    if os.path.lexists(expanded) or _looks_like_path(text):
        return ModelRef(text, path=expanded)
    name, at, revision = text.partition("@")
    if HUB_NAME.match(name) and (not at or revision.strip()) and ".." not in name:
        return ModelRef(text, repo_id=name, revision=revision.strip() or None)
    return ModelRef(text, path=expanded)  # a folder that does not exist: said so when it is opened


def parse_ref(value: object) -> ModelRef:
    """A model reference from its text (see the module docstring). An existing path is always a path."""
    if isinstance(value, ModelRef):
        return value
    text = str(value) if isinstance(value, Path) else value
    if not isinstance(text, str) or not text.strip():
        raise WeightsmithError(f"{value!r} is not a model reference (a folder, org/name, org/name@revision, or "
                               "model+adapter)")
    if os.path.lexists(_expand(text)) or "+" not in text:
        return _single(text)
    base, _, adapter = text.partition("+")
    if not base or not adapter or "+" in adapter:
        raise WeightsmithError(f"{text!r}: a model with an adapter is written MODEL+ADAPTER (one '+')")
    return replace(_single(base), text=text, lora=_single(adapter))


def rooted(text: str, root: Path | None) -> str:
    """``text`` with each relative part that exists under ``root`` (and not here) taken from there: a recipe or
    pipeline names folders relative to itself."""
    if root is None or os.path.lexists(_expand(text)):
        return text
    return "+".join(str(root / p) if not Path(_expand(p)).is_absolute() and not os.path.lexists(_expand(p))
                    and (root / p).exists() else p for p in text.split("+"))


# resolved folder -> the reference that names its bytes again (org/name@sha for the Hub)
_PINNED: dict[str, str] = {}


def pinned(folder: str | Path) -> str | None:
    """How to name ``folder`` so that it reads the same bytes again: ``org/name@commit`` (and ``+adapter@commit``)
    when it came from the Hub, else None."""
    try:
        return _PINNED.get(str(Path(folder).resolve()))
    except (OSError, RuntimeError):
        return None


def resolve_model(value: object, *, allow_pickle: bool = False, what: str = "model") -> Path:
    """The folder a stage reads for a model reference (see the module docstring). Local folders are returned as
    given (the loading gate checks them); a Hub reference is looked up in the cache, downloaded when missing and
    online; ``+adapter`` gives a folder holding the base with the adapter applied (built once, cached)."""
    ref = parse_ref(value)
    if ref.repo_id is None and ref.lora is None:
        return Path(ref.path)
    from .trust import remote_code_allowed

    key = (ref.text, allow_pickle, remote_code_allowed(), user_offline(), hub_cache(), endpoint())
    if key not in _MEMO:  # one run reads one commit of each reference, however often it is named
        _MEMO[key] = _resolve(ref, allow_pickle, what)
    return _MEMO[key]


_MEMO: dict[tuple, Path] = {}


def _resolve(ref: ModelRef, allow_pickle: bool, what: str) -> Path:
    folder, pin = _resolve_one(ref, allow_pickle, what, ref.text.partition("+")[0] if ref.lora else ref.text)
    if ref.lora is None:
        return folder
    adapter, adapter_pin = _resolve_one(ref.lora, allow_pickle, f"{what} {ref.text}: adapter", ref.lora.text)
    from .adapters import apply_adapter

    merged = apply_adapter(folder, adapter, where=f"{what} {ref.text}")
    if pin or adapter_pin:
        _remember(merged, f"{pin or ref.text.partition('+')[0]}+{adapter_pin or ref.lora.text}", ref.text)
    return merged


def _remember(folder: Path, name: str, text: str | None = None) -> None:
    _PINNED[str(Path(folder).resolve())] = name
    if text is not None:
        _PINNED_TEXT[text] = name


_PINNED_TEXT: dict[str, str] = {}


def pinned_text(text: str) -> str | None:
    """The pinned name (``org/name@sha``) of a reference text this process resolved from the Hub, or None."""
    return _PINNED_TEXT.get(text)


def _resolve_one(ref: ModelRef, allow_pickle: bool, what: str, text: str) -> tuple[Path, str | None]:
    if ref.repo_id is None:
        return Path(ref.path), None
    folder = hub_snapshot(ref, allow_pickle=allow_pickle, what=what)
    name = f"{ref.repo_id}@{folder.name}"
    _remember(folder, name, text)
    return folder, name


def hub_cache() -> str:
    """The Hugging Face cache folder, as the environment sets it now (``HF_HUB_CACHE``, else ``HF_HOME/hub``)."""
    from huggingface_hub import constants

    if os.environ.get("HF_HUB_CACHE"):
        return _expand(os.environ["HF_HUB_CACHE"])
    if os.environ.get("HF_HOME"):
        return os.path.join(_expand(os.environ["HF_HOME"]), "hub")
    return constants.HF_HUB_CACHE


def hub_timeout() -> float:
    """Seconds to wait for the Hub to connect or answer: ``HF_HUB_DOWNLOAD_TIMEOUT`` when set, else push's."""
    try:
        value = float(os.environ.get("HF_HUB_DOWNLOAD_TIMEOUT") or DEFAULT_TIMEOUT)
    except ValueError:
        raise WeightsmithError(f"HF_HUB_DOWNLOAD_TIMEOUT={os.environ['HF_HUB_DOWNLOAD_TIMEOUT']!r} is not a number "
                               "of seconds") from None
    return value if 0 < value <= 3600 else DEFAULT_TIMEOUT


def hub_snapshot(ref: ModelRef, *, allow_pickle: bool = False, what: str = "model",
                 timeout: float | None = None) -> Path:
    """The cache snapshot folder of a Hub reference: from the cache alone when offline, else after downloading
    the files a stage reads that the cache lacks."""
    from .trust import remote_code_allowed

    timeout = hub_timeout() if timeout is None else timeout
    where = f"{what} {ref.text}"
    try:
        if user_offline():
            return _cached(ref, allow_pickle, where)
        with online(timeout):
            return _download(ref, allow_pickle, remote_code_allowed(), where, timeout)
    except WeightsmithError:
        raise
    except Exception as exc:  # noqa: BLE001 - huggingface_hub's and the transport's errors, worded below
        raise _hub_error(exc, ref, where, timeout) from None


def _patterns(allow_pickle: bool, code: bool) -> list[str]:
    return [*READ_PATTERNS, *(PICKLE_PATTERNS if allow_pickle else ()), *(CODE_PATTERNS if code else ())]


def _cached(ref: ModelRef, allow_pickle: bool, where: str) -> Path:
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import LocalEntryNotFoundError

    try:
        folder = Path(snapshot_download(ref.repo_id, revision=ref.revision, cache_dir=hub_cache(),
                                        local_files_only=True, allow_patterns=_patterns(allow_pickle, False)))
    except (LocalEntryNotFoundError, FileNotFoundError):
        raise WeightsmithError(f"{where}: not in the Hugging Face cache ({hub_cache()}) and the Hub is off "
                               f"(HF_HUB_OFFLINE or offline); fetch it once online: weightsmith download "
                               f"{ref.text}") from None
    _check_complete(folder, ref, where)
    return folder


def _check_complete(folder: Path, ref: ModelRef, where: str) -> None:
    """A cached snapshot may hold only some files (another tool fetched what it needed): say which are missing."""
    import json

    index = folder / "model.safetensors.index.json"
    needed = ["config.json"] if not (folder / "adapter_config.json").exists() else []
    if index.is_file():
        try:
            needed += sorted(set(json.loads(index.read_text()).get("weight_map", {}).values()))
        except (ValueError, AttributeError, OSError):
            pass  # the loading gate words a broken index
    missing = [n for n in needed if not (folder / n).exists()]
    if missing:
        raise WeightsmithError(f"{where}: the Hugging Face cache holds only part of it ({missing[0]} is missing) and "
                               f"the Hub is off; fetch it once online: weightsmith download {ref.text}")


def _download(ref: ModelRef, allow_pickle: bool, code: bool, where: str, timeout: float) -> Path:
    from huggingface_hub import HfApi, snapshot_download

    api = HfApi(endpoint=endpoint())
    info = api.model_info(ref.repo_id, revision=ref.revision, timeout=timeout)
    files = [s.rfilename for s in info.siblings or []]
    _check_repo_files(files, allow_pickle, where)
    # snapshot_download resolves the revision once more and records it under refs/ (so the name works offline
    # later); the folder it returns is named by the commit every file came from, the one the card pins
    folder = snapshot_download(ref.repo_id, revision=ref.revision or "main", cache_dir=hub_cache(),
                               endpoint=endpoint(), allow_patterns=_patterns(allow_pickle, code), etag_timeout=timeout)
    return Path(folder)


def _check_repo_files(files: list[str], allow_pickle: bool, where: str) -> None:
    if any(f.endswith(".safetensors") for f in files):
        return
    if any(f.endswith(".bin") for f in files):
        if not allow_pickle:
            raise needs_option(f"{where}: the repo has only pickle (.bin) weights; loading them runs arbitrary code",
                               ". Set {0} if you trust this repo, or use a revision with safetensors", "allow_pickle")
        return
    raise WeightsmithError(f"{where}: the repo holds no model weights (*.safetensors)")


def _hub_error(exc: BaseException, ref: ModelRef, where: str, timeout: float) -> WeightsmithError:
    from huggingface_hub import errors

    url = endpoint()
    if isinstance(exc, errors.GatedRepoError):
        return WeightsmithError(f"{where}: {ref.repo_id} is gated on {url}; accept its terms on the Hub, then set "
                                "HF_TOKEN or run `hf auth login`")
    if isinstance(exc, errors.RevisionNotFoundError):
        return WeightsmithError(f"{where}: {ref.repo_id} has no revision {ref.revision!r} (a branch, tag or commit)")
    if isinstance(exc, errors.RepositoryNotFoundError):
        return WeightsmithError(f"{where}: no such local folder, and {url} has no model repo {ref.repo_id!r} (if it "
                                "is private or gated, set HF_TOKEN or run `hf auth login`)")
    if isinstance(exc, errors.HfHubHTTPError):
        status = getattr(getattr(exc, "response", None), "status_code", None)
        return WeightsmithError(f"{where}: {url} answered HTTP {status}; {http_hint(status, write=False)}")
    if isinstance(exc, transport_errors()):
        if is_timeout(exc):
            return WeightsmithError(f"{where}: {url} did not answer within {timeout:g} s; check HF_ENDPOINT and your "
                                    "network, or use the cache offline (HF_HUB_OFFLINE=1)")
        return WeightsmithError(f"{where}: cannot reach the Hub at {url} ({type(exc).__name__}); check HF_ENDPOINT "
                                "and your network, or use the cache offline (HF_HUB_OFFLINE=1)")
    return WeightsmithError(f"{where}: the Hub download failed ({type(exc).__name__}: {' '.join(str(exc).split())})")
