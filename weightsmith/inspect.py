"""The inspect stage: what a model folder holds, from headers alone."""
from __future__ import annotations

from collections import Counter
from pathlib import Path

from .checkpoint.layout import detect_layout
from .checkpoint.reader import Checkpoint
from .errors import WeightsmithError
from .loading import format_module


def summarize(path: str | Path, allow_pickle: bool = False, tensors: bool = False) -> dict:
    ckpt = Checkpoint(path, allow_pickle=allow_pickle)
    config = ckpt.config or {}
    fmt = (config.get("weightsmith") or {}).get("format", "plain")
    try:
        layout = detect_layout(config, ckpt.names(), str(path)).to_dict()
    except WeightsmithError as exc:
        layout = {"error": str(exc)}
    dtypes = Counter()
    for info in ckpt.tensors.values():
        dtypes[info.dtype] += info.numel
    out = {
        "path": str(ckpt.path),
        "format": fmt,
        "architecture": (config.get("architectures") or [None])[0],
        "model_type": config.get("model_type"),
        "layers": layout.get("num_blocks"),
        "layout": layout,
        "tensors_count": len(ckpt),
        "params": ckpt.num_params,
        "dtypes": dict(dtypes),
        "tensor_bytes": ckpt.nbytes,
        "size_on_disk": ckpt.size_on_disk,
        "shards": [f.name for f in ckpt.files],
    }
    if fmt != "plain":
        describe = getattr(format_module(fmt), "describe", None)
        if describe is not None:
            out.update(describe(ckpt))
    if tensors:
        out["tensors"] = [{"name": i.name, "shape": list(i.shape), "dtype": i.dtype, "file": i.file.name}
                          for i in ckpt.tensors.values()]
    return out
