"""The RPS folder format: the slot array ``rps.memory`` + every uncompressed tensor, in safetensors.

config.json is the model's own config plus ``"weightsmith": {"format": "rps", mapping, seed,
budget, sharing, modules: [...]}``; the index maps are recomputed from the seed at load time.
``load`` never allocates a compressed module's dense weight; ``export_plain`` materialises them.
"""
from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from ..checkpoint import (DEFAULT_SHARD_SIZE, Checkpoint, ShardedWriter, copy_side_files, output_folder,
                          save_state_dict, write_config)
from ..checkpoint.formats import copy_sentence_transformers_files, read_config
from ..checkpoint.card import write_model_card
from ..device import resolve_device, resolve_dtype
from ..errors import WeightsmithError
from ..progress import ProgressFn, track
from .memory import HashedMemory
from .project import attach

MEMORY_NAME = "rps.memory"


def rps_config(path: Path) -> tuple[dict, dict]:
    config = read_config(path)
    ws = dict(config.pop("weightsmith", None) or {})
    if ws.get("format") != "rps":
        raise WeightsmithError(f"{path}: config.json has no weightsmith rps section; not an RPS folder")
    for key in ("mapping", "seed", "sharing", "tile", "modules"):
        if key not in ws:
            raise WeightsmithError(f"{path}/config.json: weightsmith section lacks {key!r}; the folder is damaged")
    return config, ws


def save(model: nn.Module, folder: Path, *, budget: float, extra: dict | None = None,
         dtype: torch.dtype | None = None) -> dict:
    """Write the model's state (memory + uncompressed tensors) and the config with the rps section."""
    memory: HashedMemory = model.rps
    state = {k: (v.detach().to(dtype) if dtype is not None and v.is_floating_point() else v.detach()).cpu().contiguous()
             for k, v in model.state_dict().items()}
    save_state_dict(state, folder)
    config = model.config.to_dict()
    config.pop("weightsmith", None)
    config["architectures"] = [type(model).__name__]
    ws = {"format": "rps", "budget": budget, **memory.config(), **(extra or {})}
    config["weightsmith"] = ws
    write_config(folder, config)
    return ws


def _model_class(config: dict):
    from ..checkpoint.exact import model_class

    return model_class(config)


def assemble(config: dict, memory: HashedMemory, state: dict[str, torch.Tensor], where: Path,
             cls: type | None = None) -> nn.Module:
    """A transformers model reading its compressed modules from ``memory`` and every other tensor from ``state``
    (taken as they are: no dense weight of a compressed module is ever allocated)."""
    from accelerate import init_empty_weights

    cls = cls or _model_class(config)
    hf_config = cls.config_class.from_dict({k: v for k, v in config.items() if k != "weightsmith"})
    with init_empty_weights(include_buffers=False):  # dense weights never allocated; rotary buffers are
        model = cls(hf_config)
    attach(model, memory)
    from ..checkpoint.exact import ignored_by_transformers

    unexpected = model.load_state_dict(state, strict=False, assign=True).unexpected_keys
    _, unexpected = ignored_by_transformers(model, set(), set(unexpected))  # e.g. a stored position_ids buffer
    unexpected = sorted(unexpected)
    if unexpected:
        raise WeightsmithError(f"{where}: tensor {unexpected[0]!r} does not belong to this model's config")
    if getattr(hf_config, "tie_word_embeddings", False):
        model.tie_weights()
    left = [n for n, p in model.named_parameters() if p.is_meta]
    if left:
        raise WeightsmithError(f"{where}: tensor {left[0]}{' and more' if len(left) > 1 else ''} missing from the "
                               f"RPS folder")
    return model


def load(path: str | Path, device: str | torch.device = "cpu", dtype: torch.dtype | None = None) -> nn.Module:
    """A transformers model whose compressed modules read from the hashed memory (eval mode)."""
    path = Path(path)
    config, ws = rps_config(path)
    ckpt = Checkpoint(path)
    if MEMORY_NAME not in ckpt:
        raise WeightsmithError(f"{path}: tensor {MEMORY_NAME!r} is missing; the folder is damaged")
    from ..checkpoint.exact import check_layer_count

    check_layer_count(path, config, ckpt.names())
    memory = HashedMemory.from_config(ws, data=ckpt.get(MEMORY_NAME).clone())
    model = assemble(config, memory, {n: ckpt.get(n) for n in ckpt.names() if n != MEMORY_NAME}, path)
    model.to(resolve_device(device))
    if dtype is not None:
        model.to(resolve_dtype(dtype))
    return model.eval()


def export_plain(path: str | Path, out: str | Path, out_shard_size: int = DEFAULT_SHARD_SIZE,
                 force: bool = False, progress: ProgressFn | None = None) -> dict:
    """Write the dense checkpoint (every compressed weight materialised) that stock from_pretrained loads."""
    path, out = Path(path), Path(out)
    config, ws = rps_config(path)
    ckpt = Checkpoint(path)
    stored = ckpt.get(MEMORY_NAME)
    # read in place in its stored dtype: a slot times a sign and a power-of-two lambda is exact there
    memory = HashedMemory.from_config(ws, data=stored)
    out_dtype = stored.dtype
    dense = {f"{s.name}.weight": s for s in memory.specs.values()}
    plain = [n for n in ckpt.names() if n != MEMORY_NAME]
    plan = [(n, ckpt.get(n).dtype, tuple(ckpt.get(n).shape)) for n in plain]
    plan += [(n, out_dtype, tuple(s.shape)) for n, s in dense.items()]
    with output_folder(out, inputs=[path], force=force, stage="export") as tmp:
        writer = ShardedWriter(tmp, plan, out_shard_size)
        for n in plain:
            writer.write(n, ckpt.get(n))
        with torch.no_grad():
            for n, spec in track(progress, "materialising", list(dense.items())):
                writer.write(n, memory.weight(spec).to(out_dtype).contiguous())
        writer.close()
        write_config(tmp, config)
        copy_side_files(path, tmp)
        copy_sentence_transformers_files(path, tmp)
        write_model_card(tmp, stage="export", method=f"rps-{ws['mapping']}-materialised", inputs=[str(path)],
                         parameters={"mapping": ws["mapping"], "budget": ws.get("budget"), "seed": ws["seed"]})
    return {"output": str(out), "tensors": len(plan), "materialised": len(dense),
            "params": sum(torch.Size(s).numel() for _, _, s in plan)}


def describe(ckpt: Checkpoint) -> dict:
    """Stored vs dense parameter counts of an RPS folder."""
    ws = ckpt.config.get("weightsmith") or {}
    stored = ckpt.num_params
    slots = ckpt.info(MEMORY_NAME).numel if MEMORY_NAME in ckpt else ws.get("slots", 0)
    compressed = sum(d["shape"][0] * d["shape"][1] for d in ws.get("modules", []))
    return {"format": "rps", "mapping": ws.get("mapping"), "budget": ws.get("budget"), "seed": ws.get("seed"),
            "sharing": ws.get("sharing"), "compressed_modules": len(ws.get("modules", [])),
            "slots": slots, "compressed_params": compressed, "unique_params": stored,
            "total_params": stored - slots + compressed}
