"""The export stage: a folded or RPS folder -> a plain checkpoint that stock loaders (transformers,
sentence-transformers) read as they read any other. Each format's own ``export_plain`` does the writing."""
from __future__ import annotations

from pathlib import Path

from .errors import OptionError, WeightsmithError
from .checkpoint.formats import folder_format
from .loading import format_module
from .progress import ProgressFn
from .stage_options import ExportOptions


def export(model_path: str | Path, out: str | Path, opts: ExportOptions | None = None, *, force: bool = False,
           progress: ProgressFn | None = None, **values) -> dict:
    """Write the plain checkpoint of the folded or RPS folder ``model_path`` to ``out`` (``values`` replace fields
    of ``opts``, an :class:`ExportOptions`); returns the format and what its exporter reports."""
    o = ExportOptions.build(opts, **values)
    if not o.plain:
        raise OptionError("plain", "off: the plain checkpoint is the one export there is")
    fmt = folder_format(model_path)
    if fmt == "plain":
        raise WeightsmithError(f"{model_path} is already a plain checkpoint; export turns folded or RPS folders "
                               "into plain ones")
    info = format_module(fmt).export_plain(model_path, out, out_shard_size=o.out_shard_size, force=force,
                                           progress=progress)
    return {"format": fmt, **(info if isinstance(info, dict) else {})}
