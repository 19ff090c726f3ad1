"""The compress stage: a checkpoint (or a config) -> an RPS folder under a parameter budget.

``compress_rps`` projects a trained model into hashed memory and optionally heals it;
``train_rps`` builds an RPS model from a config and trains it from scratch, the setting of
Desai & Shrivastava (arXiv 2310.11611).
"""
from __future__ import annotations

import functools
from pathlib import Path

import torch

from ..checkpoint import Checkpoint, check_output, copy_side_files, output_folder, read_json
from ..checkpoint.card import write_model_card
from ..checkpoint.formats import copy_sentence_transformers_files, read_config, stock_config
from ..device import resolve_device
from ..errors import MissingOption, OptionError, WeightsmithError
from ..progress import ProgressFn
from ..stage_options import RpsOptions
from . import format as rps_format
from .memory import resident_bytes
from .project import init_model, plan, project, select_modules
from .train import fit

PAPER = "https://arxiv.org/abs/2310.11611"
HEAL_LR, TRAIN_LR = 1e-3, 4e-3  # peak learning rates when the options leave lr unset
TRAIN_ONLY = ("from_config", "train", "train_steps", "tokenizer")  # options the model card of a projection omits
HEAL_ONLY = ("heal_steps", "from_config", "train")


def _check_data(data: Path | None) -> None:
    if data is not None and not Path(data).is_file():
        raise WeightsmithError(f"{data}: data file not found")


def _tokens(tokenizer_dir: Path, data: Path) -> torch.Tensor:
    from ..data import load_texts
    from ..eval import load_tokenizer, tokenize

    ids = tokenize(load_tokenizer(tokenizer_dir), load_texts(data))
    return ids


def _finish(model, folder: Path, *, budget: float, inputs: list[str], method: str, params: dict,
            metrics: dict, side_from: Path | None) -> dict:
    ws = rps_format.save(model, folder, budget=budget)
    if side_from is not None:
        copy_side_files(side_from, folder)
        copy_sentence_transformers_files(side_from, folder)
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


def _check_plain(ckpt: Checkpoint, path: Path) -> None:
    fmt = (ckpt.config.get("weightsmith") or {}).get("format", "plain")
    if fmt != "plain":
        what = "already an RPS folder" if fmt == "rps" else f"a {fmt} folder"
        raise WeightsmithError(f"{path} is {what}; export it to a plain folder first")


def project_checkpoint(model_path: Path, o: RpsOptions, seed: int, progress: ProgressFn | None) -> tuple:
    """The RPS model of a checkpoint, built without its dense model: the memory (in the compressed weights' stored
    dtype) is projected from the weights one module range at a time, the other tensors are read as stored.
    Returns (model, projection stats, bytes of the dense model)."""
    from ..checkpoint.trust import open_model
    from ..loading import meta_model, stored_names

    ckpt = open_model(model_path)
    if ckpt.config is None:
        raise WeightsmithError(f"{model_path}: no config.json; transformers cannot tell which model the tensors "
                               f"belong to")
    _check_plain(ckpt, model_path)
    skeleton = meta_model(ckpt, model_path)
    chosen = select_modules(skeleton, o.modules)
    tensor_of = stored_names(skeleton, ckpt, model_path, [f"{m}.weight" for m, _ in chosen])
    names = {m: tensor_of[f"{m}.weight"] for m, _ in chosen}
    dtype = functools.reduce(torch.promote_types, (ckpt.info(n).torch_dtype for n in names.values()))
    memory = plan(chosen, budget=o.budget, mapping=o.mapping, sharing=o.sharing, tile=o.tile, seed=seed, dtype=dtype)
    stats = project(memory, ckpt.lazy(names), progress)
    compressed = set(names.values())
    state = {n: ckpt.read(n) for n in ckpt.names() if n not in compressed}
    model = rps_format.assemble(ckpt.config, memory, state, model_path, type(skeleton))
    dense = ckpt.nbytes + resident_bytes(model)["buffers"]
    return model.eval(), stats, dense


def _check_heals(model_path: Path) -> None:
    """The heal trains a causal LM on its own loss: refuse any other model before the projection, by name."""
    config = read_config(model_path) if (model_path / "config.json").is_file() else {}
    arch = (config.get("architectures") or ["?"])[0]
    if not str(arch).endswith(("ForCausalLM", "LMHeadModel")):
        raise OptionError("heal_steps", f"{model_path} is a {arch}, not a causal LM: the heal trains a language-"
                                        "model loss; compress it without healing (fold heals encoders by distillation)")


def compress_rps(model_path: str | Path, out: str | Path, opts: RpsOptions | None = None, *, device: str = "auto",
                 seed: int = 0, force: bool = False, progress: ProgressFn | None = None, **values) -> dict:
    """Project a trained checkpoint's chosen modules into hashed memory; heal for ``heal_steps`` on ``data``.
    ``values`` override fields of ``opts`` (an :class:`RpsOptions`)."""
    o = RpsOptions.build(opts, **values)
    model_path, out = Path(model_path), Path(out)
    _check_data(o.data)
    if o.heal_steps:
        _check_heals(model_path)
    check_output(out, [model_path], force)
    dev = resolve_device(device)
    model, stats, dense_bytes = project_checkpoint(model_path, o, seed, progress)
    metrics = {"relative_error": stats["relative_error"], "dense_resident_bytes": dense_bytes}
    lr = o.lr or HEAL_LR
    if o.heal_steps:
        torch.manual_seed(seed)
        losses = fit(model, _tokens(model_path, Path(o.data)), steps=o.heal_steps, lr=lr, batch_size=o.batch_size,
                     seq_len=o.seq_len, seed=seed, device=dev, progress=progress)
        metrics.update(heal_loss_first=losses[0], heal_loss_last=sum(losses[-10:]) / len(losses[-10:]))
    params = {**o.to_dict(exclude=TRAIN_ONLY), "modules": o.modules or "default", "lr": lr, "seed": seed}
    with output_folder(out, inputs=[model_path], force=force, stage="compress") as tmp:
        report = _finish(model, tmp, budget=o.budget, inputs=[str(model_path)], method=o.mapping, params=params,
                         metrics=metrics, side_from=model_path)
    return {"output": str(out), **report}


def train_rps(from_config: str | Path, out: str | Path, opts: RpsOptions | None = None, *, device: str = "auto",
              seed: int = 0, force: bool = False, progress: ProgressFn | None = None, **values) -> dict:
    """Build an RPS model from a config.json (or a model folder's config) and train it from scratch for
    ``train_steps`` on ``data``; ``values`` override fields of ``opts``."""
    from ..checkpoint.exact import model_class

    o = RpsOptions.build(opts, **values)
    src = Path(from_config)
    cfg_file = src / "config.json" if src.is_dir() else src
    if not cfg_file.is_file():
        raise WeightsmithError(f"{src}: no config.json there to build a model from")
    out = Path(out)
    if o.data is None:
        raise MissingOption("data", "training a model from a config needs text to train on")
    _check_data(o.data)
    check_output(out, [cfg_file.parent], force)
    config = stock_config(read_json(cfg_file, str(cfg_file)))
    config.pop("weightsmith", None)
    tok_dir = Path(o.tokenizer) if o.tokenizer else cfg_file.parent
    tokens = _tokens(tok_dir, Path(o.data))
    cls = model_class(config)
    torch.manual_seed(seed)
    model = cls(cls.config_class.from_dict(config))
    init_model(model, budget=o.budget, mapping=o.mapping, pattern=o.modules, sharing=o.sharing, tile=o.tile, seed=seed)
    lr = o.lr or TRAIN_LR
    losses = fit(model, tokens, steps=o.train_steps, lr=lr, batch_size=o.batch_size, seq_len=o.seq_len, seed=seed,
                 device=device, progress=progress, label="training")
    params = {**o.to_dict(exclude=HEAL_ONLY), "modules": o.modules or "default", "lr": lr, "seed": seed}
    metrics = {"train_loss_first": losses[0] if losses else None,
               "train_loss_last": sum(losses[-10:]) / len(losses[-10:]) if losses else None}
    with output_folder(out, inputs=[cfg_file.parent], force=force, stage="compress") as tmp:
        report = _finish(model, tmp, budget=o.budget, inputs=[str(src)], method=o.mapping, params=params,
                         metrics=metrics, side_from=tok_dir)
    return {"output": str(out), **report}
