"""The compress stage: a checkpoint (or a config) -> an RPS folder under a parameter budget.

``compress_rps`` projects a trained model into hashed memory and optionally heals it;
``train_rps`` builds an RPS model from a config and trains it from scratch, the setting of
Desai & Shrivastava (arXiv 2310.11611).
"""
from __future__ import annotations

from pathlib import Path

import torch

from ..checkpoint import check_output, copy_side_files, output_folder, read_json
from ..checkpoint.card import write_model_card
from ..device import resolve_device
from ..errors import WeightsmithError
from ..progress import ProgressFn
from . import format as rps_format
from .hashing import MAPPINGS
from .memory import SHARING, resident_bytes
from .project import compress_model, init_model
from .train import fit

PAPER = "https://arxiv.org/abs/2310.11611"


def _check(budget: float, mapping: str, sharing: str, steps: int, data: str | Path | None, what: str) -> None:
    if not 0 < budget <= 4:
        raise WeightsmithError(f"--budget {budget} must be in (0, 4]: stored / original parameters, e.g. 0.1")
    if mapping not in MAPPINGS:
        raise WeightsmithError(f"--mapping {mapping!r} is not one of {', '.join(MAPPINGS)}")
    if sharing not in SHARING:
        raise WeightsmithError(f"--sharing {sharing!r} is not one of {', '.join(SHARING)}")
    if steps < 0:
        raise WeightsmithError(f"{what} {steps} must be >= 0")
    if steps and data is None:
        raise WeightsmithError(f"{what} {steps} needs --data TEXT to train on")
    if data is not None and not Path(data).is_file():
        raise WeightsmithError(f"--data {data}: file not found")


def _tokens(tokenizer_dir: Path, data: Path) -> torch.Tensor:
    from ..eval import load_texts, load_tokenizer, tokenize

    ids = tokenize(load_tokenizer(tokenizer_dir), load_texts(data))
    return ids


def _finish(model, folder: Path, *, budget: float, inputs: list[str], method: str, params: dict,
            metrics: dict, side_from: Path | None) -> dict:
    ws = rps_format.save(model, folder, budget=budget)
    if side_from is not None:
        copy_side_files(side_from, folder)
    mem = model.rps
    compressed = sum(s.numel for s in mem.specs.values())
    report = {"mapping": mem.mapping, "budget": budget, "slots": mem.num_slots, "compressed_params": compressed,
              "compressed_modules": len(mem.specs), "stored_params": sum(p.numel() for p in model.parameters()),
              "resident_bytes": resident_bytes(model)["total"], **metrics}
    write_model_card(folder, stage="compress", method=f"rps-{ws['mapping']}", inputs=inputs,
                     parameters={**params, "slots": mem.num_slots, "modules": len(mem.specs)},
                     metrics=[{"model": folder.name.split(".tmp-")[0],
                               **{k: v for k, v in report.items() if isinstance(v, (int, float))}}],
                     notes=f"Randomized parameter sharing ({PAPER}): every compressed weight is read from one "
                           f"array of {mem.num_slots} slots. Load with `weightsmith.load`; "
                           f"`weightsmith export --plain` writes a dense copy.")
    return report


def compress_rps(model_path: str | Path, out: str | Path, *, budget: float = 0.1, mapping: str = "stable",
                 modules: str | None = None, sharing: str = "global", tile: int = 64, heal_steps: int = 0,
                 data: str | Path | None = None, lr: float = 1e-3, batch: int = 16, seq: int = 64,
                 device: str = "auto", seed: int = 0, force: bool = False,
                 progress: ProgressFn | None = None) -> dict:
    """Project a trained checkpoint's chosen modules into hashed memory; heal for ``heal_steps`` on ``data``."""
    from ..loading import load

    model_path, out = Path(model_path), Path(out)
    _check(budget, mapping, sharing, heal_steps, data, "--heal-steps")
    check_output(out, [model_path], force)
    dev = resolve_device(device)
    model = load(model_path, device=dev)
    if getattr(model, "rps", None) is not None:
        raise WeightsmithError(f"{model_path} is already an RPS folder; export it --plain first")
    dense_bytes = resident_bytes(model)["total"]
    _, stats = compress_model(model, budget=budget, mapping=mapping, pattern=modules, sharing=sharing, tile=tile,
                              seed=seed, progress=progress)
    metrics = {"relative_error": stats["relative_error"], "dense_resident_bytes": dense_bytes}
    if heal_steps:
        torch.manual_seed(seed)
        losses = fit(model, _tokens(model_path, Path(data)), steps=heal_steps, lr=lr, batch=batch, seq=seq,
                     seed=seed, device=dev, progress=progress)
        metrics.update(heal_loss_first=losses[0], heal_loss_last=sum(losses[-10:]) / len(losses[-10:]))
    params = {"budget": budget, "mapping": mapping, "modules": modules or "default", "sharing": sharing,
              "tile": tile, "heal_steps": heal_steps, "lr": lr, "seed": seed}
    with output_folder(out, inputs=[model_path], force=force) as tmp:
        report = _finish(model, tmp, budget=budget, inputs=[str(model_path)], method=mapping, params=params,
                         metrics=metrics, side_from=model_path)
    return {"output": str(out), **report}


def train_rps(from_config: str | Path, out: str | Path, *, budget: float = 0.1, mapping: str = "stable",
              modules: str | None = None, sharing: str = "global", tile: int = 64, data: str | Path | None = None,
              train_steps: int = 500, lr: float = 4e-3, batch: int = 32, seq: int = 64,
              tokenizer: str | Path | None = None, device: str = "auto", seed: int = 0, force: bool = False,
              progress: ProgressFn | None = None) -> dict:
    """Build an RPS model from a config.json (or a model folder's config) and train it from scratch."""
    from ..loading import model_class

    src = Path(from_config)
    cfg_file = src / "config.json" if src.is_dir() else src
    if not cfg_file.is_file():
        raise WeightsmithError(f"--from-config {src}: no config.json there")
    out = Path(out)
    _check(budget, mapping, sharing, train_steps, data, "--train-steps")
    if data is None:
        raise WeightsmithError("--train needs --data TEXT")
    check_output(out, [cfg_file.parent], force)
    config = read_json(cfg_file, str(cfg_file))
    config.pop("weightsmith", None)
    tok_dir = Path(tokenizer) if tokenizer else cfg_file.parent
    tokens = _tokens(tok_dir, Path(data))
    cls = model_class(config)
    torch.manual_seed(seed)
    model = cls(cls.config_class.from_dict(config))
    init_model(model, budget=budget, mapping=mapping, pattern=modules, sharing=sharing, tile=tile, seed=seed)
    losses = fit(model, tokens, steps=train_steps, lr=lr, batch=batch, seq=seq, seed=seed, device=device,
                 progress=progress, label="training")
    params = {"budget": budget, "mapping": mapping, "modules": modules or "default", "sharing": sharing,
              "tile": tile, "train_steps": train_steps, "lr": lr, "batch": batch, "seq": seq, "seed": seed}
    metrics = {"train_loss_first": losses[0] if losses else None,
               "train_loss_last": sum(losses[-10:]) / len(losses[-10:]) if losses else None}
    with output_folder(out, inputs=[cfg_file.parent], force=force) as tmp:
        report = _finish(model, tmp, budget=budget, inputs=[str(src)], method=mapping, params=params,
                         metrics=metrics, side_from=tok_dir)
    return {"output": str(out), **report}
