from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from . import app
from .common import JsonOpt, QuietOpt, Table, console, human_bytes, model_folder, print_json, progress_bars


@app.command("push")
def push_cmd(
    folder: Annotated[Path, typer.Argument(help="Model to upload: a folder (validated first; never modified), a cache "
                                                "snapshot or a Hub name.")],
    repo_id: Annotated[str, typer.Argument(help="Hub model repo, OWNER/NAME; created if missing.")],
    private: Annotated[bool, typer.Option("--private", help="Create the repo as private (an existing repo keeps its visibility).")] = False,
    revision: Annotated[str | None, typer.Option("--revision", help="Branch to commit to, created if missing (default: main).")] = None,
    message: Annotated[str | None, typer.Option("--message", "-m", help="Commit message (default: 'Upload NAME with weightsmith').")] = None,
    dry_run: Annotated[bool, typer.Option("--dry-run", help="List the files that would be uploaded, with sizes; send nothing.")] = False,
    timeout: Annotated[float, typer.Option("--timeout", help="Seconds to wait for the Hub to connect (at most 10) and to answer each request.")] = 60.0,
    weightsmith_format: Annotated[bool, typer.Option("--weightsmith-format", help="Upload a folded or RPS folder as it is (it loads with weightsmith.load; stock transformers would fill its shared or hashed weights at random).")] = False,
    json_out: JsonOpt = False,
    quiet: QuietOpt = False,
) -> None:
    """Upload a model folder and its model card to the Hugging Face Hub (token: HF_TOKEN or `hf auth login`; HF_ENDPOINT respected).

    A README.md model card is generated for the upload when the folder has none; the folder itself is left untouched.
    """
    from ..checkpoint.hub import push

    folder = model_folder(folder)
    with progress_bars(not quiet and not json_out) as progress:
        result = push(folder, repo_id, private=private, revision=revision, dry_run=dry_run, commit_message=message,
                      timeout=timeout, progress=progress, weightsmith_format=weightsmith_format)
    if json_out:
        print_json(result)
        return
    console.print(f"{'would upload' if dry_run else 'uploaded'} to {result['endpoint']}/{repo_id} @ {result['revision']}",
                  highlight=False, soft_wrap=True)
    table = Table("file", "size")
    for f in result["files"]:
        table.add_row(f["path"] + ("  (generated model card)" if f["generated"] else ""), human_bytes(f["size"]))
    table.add_row(f"{len(result['files'])} files", human_bytes(result["total_bytes"]), style="bold")
    console.print(table)
    if not dry_run:
        console.print(f"commit {result.get('commit')}: {result.get('commit_url')}")
