"""The push stage: upload a validated model folder, with its model card, to the Hugging Face Hub.

The user's folder is never modified: the files to upload are staged as links in a temporary folder,
together with a generated README.md when the folder has none, and that staging folder is uploaded.
"""
from __future__ import annotations

import os
import re
import shutil
import tempfile
from fnmatch import fnmatch
from pathlib import Path

from ..errors import OptionError, WeightsmithError, needs_option
from ..progress import ProgressFn, report
from .files import member
from .formats import loads_stock
from .network import DEFAULT_TIMEOUT, http_hint, is_timeout, online, transport_errors
from .reader import Checkpoint

REPO_ID = re.compile(r"^[A-Za-z0-9][\w.-]{0,95}/[A-Za-z0-9][\w.-]{0,95}$")
# Bookkeeping that describes how a folder was made on this machine, not the model.
LOCAL_ONLY = (".weightsmith-stage.json", ".weightsmith-output", "*.tmp-*", ".git", ".git/*", "**/.git/**", ".cache/*", "**/.cache/**",
              "**/__pycache__/**", ".DS_Store")


def _ignored(rel: str) -> bool:
    return any(fnmatch(rel, pat) or fnmatch(Path(rel).name, pat) for pat in LOCAL_ONLY)


def plan_push(folder: str | Path, weightsmith_format: bool = False) -> dict:
    """Validate ``folder`` and list what a push uploads: ``{"files": [{"path", "size", "generated"}], ...}``. A
    folder stock transformers would get wrong (an RPS folder, a folded one that shares blocks: weights it would fill
    at random) is refused unless ``weightsmith_format`` says it is meant to be uploaded as it is."""
    folder = Path(folder)
    ckpt = Checkpoint(folder)
    if ckpt.config is None:
        raise WeightsmithError(f"{folder}: no config.json; the Hub cannot load a model folder without one")
    fmt = (ckpt.config.get("weightsmith") or {}).get("format", "plain")
    if not loads_stock(ckpt.config) and not weightsmith_format:
        raise needs_option(f"{folder} is a weightsmith {fmt} folder: stock transformers would load it with its "
                           "shared or hashed weights filled at random", "; upload the plain checkpoint `weightsmith "
                           "export` writes of it, or set {0} to upload it as it is (it loads with weightsmith.load)",
                           "weightsmith_format")
    files = []
    for p in sorted(folder.rglob("*")):
        rel = p.relative_to(folder).as_posix()
        if _ignored(rel) or p.is_dir():  # a folder (symlinked or not) is listed by the files in it
            continue
        path = member(folder, rel, folder)  # inside the folder (symlinks too) and a regular file, or refused
        files.append({"path": rel, "size": path.stat().st_size, "generated": False})
    card = None
    if not (folder / "README.md").is_file():
        card = _default_card_text(folder, ckpt)
        files.append({"path": "README.md", "size": len(card.encode()), "generated": True})
        files.sort(key=lambda f: f["path"])
    return {"folder": str(folder), "format": fmt, "files": files, "total_bytes": sum(f["size"] for f in files),
            "card": card}


def _default_card_text(folder: Path, ckpt: Checkpoint) -> str:
    from .card import write_model_card
    from .writer import write_config

    config = ckpt.config or {}
    fmt = (config.get("weightsmith") or {}).get("format", "plain")
    source = config.get("_name_or_path")
    params = {"architecture": (config.get("architectures") or [None])[0], "parameters": ckpt.num_params,
              "format": fmt}
    with tempfile.TemporaryDirectory() as tmp:
        target = Path(tmp) / folder.resolve().name
        target.mkdir()
        write_config(target, config)  # the card says what loads the folder (a weightsmith format: not transformers)
        # _name_or_path is the folder's own text, not a folder this push read: named on the card, never opened
        path = write_model_card(target, stage="push", method=fmt, inputs=[source] if source else [],
                                parameters=params, read_inputs=False,
                                notes="This card was written at upload time because the folder had none.")
        return path.read_text()


def check_timeout(timeout) -> float:
    if isinstance(timeout, bool) or not isinstance(timeout, (int, float)) or not 0 < timeout <= 3600:
        raise OptionError("timeout", f"{timeout!r} must be a number of seconds in (0, 3600]")
    return float(timeout)


def check_repo_id(repo_id: str) -> str:
    if not REPO_ID.match(repo_id) or ".." in repo_id or repo_id.endswith((".git", ".")):
        raise WeightsmithError(f"repo id {repo_id!r} is not of the form OWNER/NAME (letters, digits, '-', '_', '.')")
    return repo_id


def _stage(folder: Path, plan: dict, into: Path) -> None:
    for f in plan["files"]:
        dst = into / f["path"]
        dst.parent.mkdir(parents=True, exist_ok=True)
        if f["generated"]:
            dst.write_text(plan["card"])
            continue
        src = (folder / f["path"]).resolve()
        try:
            os.symlink(src, dst)
        except OSError:
            shutil.copy2(src, dst)


def push(folder: str | Path, repo_id: str, *, private: bool = False, revision: str | None = None,
         dry_run: bool = False, token: str | None = None, commit_message: str | None = None,
         timeout: float = DEFAULT_TIMEOUT, progress: ProgressFn | None = None, weightsmith_format: bool = False) -> dict:
    """Upload ``folder`` to the Hub model repo ``repo_id`` (created if missing). Returns what was (or would be) sent.
    A folded or RPS folder only with ``weightsmith_format`` (see ``plan_push``).

    Every request waits at most ``timeout`` seconds for the server (connect: at most 10 s)."""
    folder = Path(folder)
    check_repo_id(repo_id)
    check_timeout(timeout)
    plan = plan_push(folder, weightsmith_format)
    endpoint = os.environ.get("HF_ENDPOINT", "https://huggingface.co").rstrip("/")
    result = {"repo_id": repo_id, "endpoint": endpoint, "revision": revision or "main", "private": private,
              "dry_run": dry_run, "folder": plan["folder"], "format": plan["format"],
              "files": [{k: f[k] for k in ("path", "size", "generated")} for f in plan["files"]],
              "total_bytes": plan["total_bytes"]}
    if dry_run:
        return result
    from huggingface_hub import HfApi
    from huggingface_hub.errors import HfHubHTTPError

    api = HfApi(endpoint=endpoint, token=token)
    message = commit_message or f"Upload {folder.resolve().name} with weightsmith"
    steps = 3 if revision and revision != "main" else 2
    try:
        with online(timeout), tempfile.TemporaryDirectory(prefix="weightsmith-push-") as tmp:
            report(progress, f"push {repo_id}", 0, steps)
            url = api.create_repo(repo_id, private=private, exist_ok=True, repo_type="model")
            report(progress, f"push {repo_id}", 1, steps)
            if steps == 3:
                api.create_branch(repo_id, branch=revision, exist_ok=True, repo_type="model")
                report(progress, f"push {repo_id}", 2, steps)
            _stage(folder, plan, Path(tmp))
            info = api.upload_folder(repo_id=repo_id, folder_path=tmp, revision=revision, repo_type="model",
                                     commit_message=message)
            report(progress, f"push {repo_id}", steps, steps)
    except HfHubHTTPError as exc:
        status = getattr(exc.response, "status_code", None)
        raise WeightsmithError(f"push to {endpoint}/{repo_id} failed (HTTP {status}): "
                               f"{http_hint(status, write=True)}") from exc
    except ValueError as exc:  # an answer that is not the Hub API's JSON (an HTML page, a proxy's login form)
        raise WeightsmithError(f"push to {endpoint}/{repo_id} failed: the server's answer is not the Hub API's "
                               f"({type(exc).__name__}); check HF_ENDPOINT") from None
    except transport_errors() as exc:
        if is_timeout(exc):
            raise needs_option(f"push to {endpoint}/{repo_id} failed: the server did not answer within {timeout:g} s",
                               "; check HF_ENDPOINT and your network, or raise {0}", "timeout") from None
        raise WeightsmithError(f"push to {endpoint}/{repo_id} failed: cannot reach the Hub ({exc})") from None
    result.update(url=str(url), commit_url=getattr(info, "commit_url", None), commit=getattr(info, "oid", None))
    return result
