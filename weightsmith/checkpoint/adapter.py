"""PEFT adapter folders: ``adapter_config.json`` beside ``adapter_model.safetensors``, the layout
``peft.PeftModel.from_pretrained`` reads."""
from __future__ import annotations

import json
from pathlib import Path

import torch

ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"


def write_adapter(folder: str | Path, tensors: dict[str, torch.Tensor], config: dict) -> int:
    """Write the adapter's tensors and config into ``folder`` (an ``output_folder``); returns the weights' bytes."""
    from safetensors.torch import save_file

    folder = Path(folder)
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(folder / ADAPTER_WEIGHTS), metadata={"format": "pt"})
    (folder / ADAPTER_CONFIG).write_text(json.dumps(config, indent=2) + "\n")
    return (folder / ADAPTER_WEIGHTS).stat().st_size
