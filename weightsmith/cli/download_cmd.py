"""``weightsmith download``: fetch a Hub model into the Hugging Face cache, as any stage would, and print its folder."""
from __future__ import annotations

from typing import Annotated

import typer

from . import app
from .common import JsonOpt, PickleOpt, TrustCodeOpt, console, model_folder, print_json


@app.command("download")
def download_cmd(
    model: Annotated[str, typer.Argument(help="org/name, org/name@revision (branch, tag or commit) or "
                                              "model+adapter.")],
    allow_pickle: PickleOpt = False,
    trust_remote_code: TrustCodeOpt = False,
    json_out: JsonOpt = False,
) -> None:
    """Put the files every stage reads of a Hub model (weights, config, tokenizer) into the Hugging Face cache, then
    print the folder; later runs, offline ones included, read it from there."""
    from ..checkpoint.sources import pinned
    from ..checkpoint.trust import remote_code

    from ..errors import WeightsmithError

    with remote_code(trust_remote_code):
        folder = model_folder(model, allow_pickle=allow_pickle)
    if not folder.is_dir():
        raise WeightsmithError(f"{model}: not a model folder (no such directory)")
    result = {"model": model, "folder": str(folder), "pinned": pinned(folder)}
    if json_out:
        print_json(result)
    else:
        console.print(f"{result['pinned'] or model} -> {folder}", highlight=False, soft_wrap=True)
