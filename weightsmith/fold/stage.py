"""The fold stage (FoldGPT): choose blocks to remove (learnable gates, or ShortGPT BI / angular distance
for comparison), share weights within groups of adjacent kept blocks, heal with tail-layer distillation,
and write a folded folder that ``weightsmith.load`` opens and ``export --plain`` flattens.
"""
from __future__ import annotations

import copy
from pathlib import Path

import torch

from ..checkpoint import check_output, copy_side_files, output_folder, read_json
from ..checkpoint.card import write_model_card
from ..device import resolve_device
from ..errors import WeightsmithError
from ..progress import ProgressFn
from .analyze import block_states
from .blocks import block_list, is_causal_lm
from .data import calibration_windows, model_seq
from .gates import gate_importance, lowest
from .plan import SHARE_INITS, fold_model, parse_share, removal_count
from .pooling import Pooling, copy_sentence_transformers_files, read_pooling
from .ranks import Clock, Ranks
from .removal import loss_importance
from .similarity import angular_distance, angular_drop, block_influence, shortgpt_drop

IMPORTANCE = ("loss", "gates", "bi", "angular")


def choose_removed(model: torch.nn.Module, windows: torch.Tensor, k: int, importance: str, *, gate_steps: int,
                   batch_size: int, seed: int, device, progress: ProgressFn | None,
                   pooling: Pooling | None = None) -> tuple[list[int], dict]:
    """Blocks to remove and the scores behind the choice."""
    n = len(block_list(model))
    if importance == "loss":
        return loss_importance(model, windows, k, batch_size=batch_size, device=device, pooling=pooling,
                               progress=progress)
    if importance == "gates":
        g = gate_importance(model, windows, n - k, steps=gate_steps, batch_size=batch_size, seed=seed,
                            device=device, pooling=pooling, progress=progress)
        return lowest(g, k), {"gates": [round(v, 5) for v in g]}
    states = block_states(model, windows, batch_size=batch_size, device=device, progress=progress)
    if importance == "bi":
        bi = block_influence(states)
        return shortgpt_drop(bi, k), {"block_influence": [round(v, 5) for v in bi.tolist()]}
    dist = angular_distance(states, last_token=True)
    return angular_drop(dist, k), {"angular_distance_n": [None if v != v else round(v, 5) for v in dist[:, max(k, 1) - 1].tolist()]}


def heal_calibration(tok, data, seq: int, max_tokens: int, causal: bool, windows: torch.Tensor | None):
    """What the heal trains on: token windows for causal LMs (``windows`` when they are the same tokens),
    each line a separate padded input for encoders (the way they are used)."""
    from ..training import calibration_sentences

    if not causal:
        return calibration_sentences(tok, data, seq_len=seq, max_tokens=max_tokens)
    return windows if windows is not None else calibration_windows(tok, data, seq=seq, max_tokens=max_tokens, causal=True)


def fold(model_path: str | Path, out: str | Path, *, data: str | Path, remove: float = 0.25, share: str = "1",
         share_init: str = "average", importance: str = "loss", relax_rank: int = 0, heal_steps: int = 0,
         heal_lr: float = 3e-4, heal_tail: int = 2, heal_lora: int = 0, gate_steps: int = 200, seq: int | None = None,
         max_tokens: int = 16384, heal_max_tokens: int | None = None, batch_size: int = 8, seed: int = 0, device: str = "auto",
         max_shard_size: str = "5GB", force: bool = False, model: torch.nn.Module | None = None,
         progress: ProgressFn | None = None) -> dict:
    """Fold ``model_path`` into ``out``; returns the plan, the heal losses and the seconds per stage.

    Under ``accelerate launch`` every rank loads the model, rank 0 chooses the blocks (the others get its
    choice), the heal runs data-parallel, and rank 0 alone writes ``out`` while the others wait.
    """
    from ..eval import count_params, load_tokenizer
    from ..loading import folder_format, load

    model_path = Path(model_path)
    if importance not in IMPORTANCE:
        raise WeightsmithError(f"--importance {importance!r} is not one of {', '.join(IMPORTANCE)}")
    if share_init not in SHARE_INITS:
        raise WeightsmithError(f"--share-init {share_init!r} is not one of {', '.join(SHARE_INITS)}")
    if relax_rank < 0 or heal_steps < 0 or heal_lora < 0 or gate_steps < 1:
        raise WeightsmithError("--relax-rank, --heal-steps and --heal-lora must be >= 0 and --gate-steps >= 1")
    if batch_size < 1:
        raise WeightsmithError(f"--batch-size {batch_size} must be >= 1")
    if heal_max_tokens is not None and heal_max_tokens < 1:
        raise WeightsmithError(f"--heal-max-tokens {heal_max_tokens} must be >= 1")
    if not Path(data).exists():
        raise WeightsmithError(f"{data}: data file not found")
    if folder_format(model_path) != "plain":
        raise WeightsmithError(f"{model_path}: already a {folder_format(model_path)} folder; fold a plain checkpoint")
    config = read_json(model_path / "config.json", "config.json")
    ranks = Ranks.start(device)
    refused = None
    if ranks.rank == 0:  # checks and locks the output for the run; the other ranks stop with its refusal
        try:
            check_output(out, [model_path], force)
        except WeightsmithError as exc:
            refused = str(exc)
    refused = ranks.from_rank0(refused)
    if refused:
        raise WeightsmithError(refused)
    if heal_steps and batch_size % ranks.world:
        raise WeightsmithError(f"--batch-size {batch_size} must be a multiple of the {ranks.world} processes "
                               f"(each rank heals on an equal share of every batch)")
    clock = Clock()
    torch.manual_seed(seed)
    dev = ranks.device if ranks.world > 1 else resolve_device(device)
    teacher = model if model is not None else load(model_path, device=dev)
    n = len(block_list(teacher))
    k = removal_count(remove, n)
    if k >= n:
        raise WeightsmithError(f"--remove {remove} would remove all {n} blocks")
    sizes = parse_share(share, n - k)
    causal = is_causal_lm(teacher)
    pooling = None if causal else read_pooling(model_path)
    tok = load_tokenizer(model_path)
    windows = calibration_windows(tok, data, seq=model_seq(teacher, seq), max_tokens=max_tokens, causal=causal)
    clock.lap("load")
    removed, scores = [], {}
    if k and ranks.rank == 0:
        removed, scores = choose_removed(teacher, windows, k, importance, gate_steps=gate_steps, batch_size=batch_size,
                                         seed=seed, device=dev, progress=progress, pooling=pooling)
    removed, scores = ranks.from_rank0((removed, scores))
    clock.lap("importance")
    folded = fold_model(teacher, config, removed, sizes, share_init=share_init, relax_rank=relax_rank,
                        extra={"importance": importance, "scores": scores})
    clock.lap("fold")
    healed = {}
    if heal_steps:
        from .heal import heal
        heal_data = heal_calibration(tok, data, model_seq(teacher, seq), heal_max_tokens or max_tokens, causal,
                                     windows if heal_max_tokens in (None, max_tokens) else None)
        healed = heal(folded, teacher, heal_data, steps=heal_steps, lr=heal_lr, tail=heal_tail, batch_size=batch_size,
                      lora_rank=heal_lora, seed=seed, device=dev, pooling=pooling, progress=progress)
        clock.lap("heal")
    fold_map = copy.deepcopy(folded.config.weightsmith)
    fold_map.update(heal_steps=heal_steps)
    from .format import folded_config, save
    cfg = folded_config(config, fold_map["kept"], {k2: v for k2, v in fold_map.items() if k2 != "format"})
    result = {"model": str(model_path), "out": str(out), "blocks": n, "removed": removed, "kept": fold_map["kept"],
              "groups": fold_map["groups"], "importance": importance, "scores": scores,
              "params_original": count_params(teacher), "params_unique": count_params(folded), **healed}
    if pooling is not None:
        result["pooling"] = pooling.source
    if ranks.rank == 0:
        with output_folder(out, inputs=[model_path], force=force) as tmp:
            save(folded.to("cpu"), tmp, cfg, max_shard_size)
            copy_side_files(model_path, tmp)
            copy_sentence_transformers_files(model_path, tmp)
            params = {"remove": remove, "share": share, "share_init": share_init, "importance": importance,
                      "relax_rank": relax_rank, "heal_steps": heal_steps, "heal_lr": heal_lr, "heal_tail": heal_tail,
                      "heal_lora": heal_lora, "heal_max_tokens": heal_max_tokens or max_tokens, "gate_steps": gate_steps, "seed": seed, "data": str(data),
                      "processes": ranks.world}
            write_model_card(tmp, stage="fold", method=f"FoldGPT ({importance} importance)", inputs=[str(model_path)],
                             parameters=params, metrics=[{"model": Path(out).name, "blocks": len(fold_map["kept"]),
                                                          "removed": str(removed), "unique_params": result["params_unique"],
                                                          "original_params": result["params_original"]}],
                             notes="Blocks in a group share one set of weights (stored once); load with "
                                   "`weightsmith.load`, or flatten with `weightsmith export --plain`.")
    ranks.barrier()  # the others return once the output is in place
    clock.lap("write")
    result["seconds"] = clock.laps
    result["rank"], result["processes"] = ranks.rank, ranks.world
    return result
