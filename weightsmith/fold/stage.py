"""The fold stage (FoldGPT): choose blocks to remove (learnable gates, or ShortGPT BI / angular distance
for comparison), share weights within groups of adjacent kept blocks, heal with tail-layer distillation,
and write a folded folder that ``weightsmith.load`` opens and ``export --plain`` flattens.
"""
from __future__ import annotations

import copy
from dataclasses import dataclass
from pathlib import Path

import torch

from ..checkpoint import check_output, copy_side_files, output_folder, read_json
from ..checkpoint.card import write_model_card
from ..checkpoint.formats import copy_sentence_transformers_files
from ..device import resolve_device
from ..errors import OptionError, WeightsmithError
from ..progress import ProgressFn
from ..stage_options import FoldOptions
from .analyze import block_similarity
from .blocks import block_list, is_causal_lm
from ..data import calibration_windows
from .data import model_seq
from .gates import gate_importance, lowest
from .heal import merge_lora
from .plan import fold_model, parse_share, removal_count
from ..pooling import Pooling, read_pooling
from .ranks import Clock, Ranks
from .removal import loss_importance
from .similarity import angular_drop, shortgpt_drop

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
    stats = block_similarity(model, windows, batch_size=batch_size, device=device, progress=progress,
                             mean_angular=False, cka=False)
    if importance == "bi":
        bi = stats.block_influence()
        return shortgpt_drop(bi, k), {"block_influence": [round(v, 5) for v in bi.tolist()]}
    dist = stats.angular_distance(last_token=True)
    return angular_drop(dist, k), {"angular_distance_n": [None if v != v else round(v, 5) for v in dist[:, max(k, 1) - 1].tolist()]}


def heal_calibration(tok, data, seq: int, max_tokens: int, causal: bool, windows: torch.Tensor | None):
    """What the heal trains on: token windows for causal LMs (``windows`` when they are the same tokens),
    each line a separate padded input for encoders (the way they are used)."""
    from ..data import calibration_sentences

    if not causal:
        return calibration_sentences(tok, data, seq_len=seq, max_tokens=max_tokens)
    return windows if windows is not None else calibration_windows(tok, data, seq_len=seq, max_tokens=max_tokens, causal=True)


# keyword names older callers use for an option (the options class has one name per concept)
def fold(model_path: str | Path, out: str | Path, opts: FoldOptions | None = None, *, seed: int = 0,
         device: str = "auto", force: bool = False, model: torch.nn.Module | None = None,
         progress: ProgressFn | None = None, **options) -> dict:
    """Fold ``model_path`` into ``out`` as ``opts`` says (or ``options``, keywords of ``FoldOptions`` replacing
    its fields); returns the plan, the heal losses and the seconds per stage.

    Under ``accelerate launch`` or ``torchrun`` every rank loads the model, rank 0 chooses the blocks (the others
    get its choice), the heal runs data-parallel (or sharded: ``fsdp``), and rank 0 alone writes ``out`` while
    the others wait.
    """
    from ..eval import count_params

    opts = FoldOptions.build(opts, **options)
    model_path = Path(model_path)
    config = _check_inputs(model_path, opts)
    ranks = Ranks.start(device)
    _claim_output(ranks, out, model_path, force, opts)
    clock = Clock()
    torch.manual_seed(seed)
    dev = ranks.device if ranks.world > 1 else resolve_device(device)
    teacher = model if model is not None else _load(model_path, dev, opts.dtype)
    job = _prepare(model_path, teacher, opts)
    clock.lap("load")
    removed, scores = [], {}
    if job.k and ranks.rank == 0:
        removed, scores = choose_removed(teacher, job.windows, job.k, opts.importance, gate_steps=opts.gate_steps,
                                         batch_size=opts.batch_size, seed=seed, device=dev, progress=progress,
                                         pooling=job.pooling)
    removed, scores = ranks.from_rank0((removed, scores))
    clock.lap("importance")
    picks = None
    if opts.share_init == "best":  # measured on rank 0, like the removal
        picks = _measured_picks(teacher, config, removed, job, opts, dev, progress, scores) if ranks.rank == 0 else None
        picks, scores = ranks.from_rank0((picks, scores))
    folded = fold_model(teacher, config, removed, job.sizes, share_init=opts.share_init, relax_rank=opts.relax_rank,
                        extra={"importance": opts.importance, "scores": scores}, picks=picks)
    clock.lap("fold")
    params_original, params_unique = count_params(teacher), count_params(folded)
    healed, gathered = {}, {}
    if opts.heal_steps:
        healed = _heal(folded, teacher, job, opts, seed=seed, device=dev, progress=progress, gathered=gathered,
                       keep_teacher=model is not None)
    del teacher, model  # the blocks the fold dropped go (unless the caller holds the model)
    if opts.heal_steps:
        folded = _healed_model(folded, config, opts, gathered)
        clock.lap("heal")
    fold_map = copy.deepcopy(folded.config.weightsmith)
    fold_map.update(heal_steps=opts.heal_steps)
    result = {"model": str(model_path), "out": str(out), "blocks": job.n, "removed": removed,
              "kept": fold_map["kept"], "groups": fold_map["groups"], "importance": opts.importance, "scores": scores,
              "params_original": params_original, "params_unique": params_unique, **healed}
    if job.pooling is not None:
        result["pooling"] = job.pooling.source
    if ranks.rank == 0:
        _write(folded, config, fold_map, result, opts, out, model_path, seed=seed, processes=ranks.world, force=force)
    ranks.barrier()  # the others return once the output is in place
    clock.lap("write")
    result["seconds"] = clock.laps
    result["rank"], result["processes"] = ranks.rank, ranks.world
    return result


def _measured_picks(teacher, config: dict, removed: list[int], job: "_Job", opts: FoldOptions, device, progress,
                    scores: dict) -> list[int]:
    """``share_init="best"``: each group's member measured on the calibration windows (losses into ``scores``)."""
    from .share_init import best_members

    trial = fold_model(teacher, config, removed, job.sizes, share_init="first")
    fm = trial.config.weightsmith
    picks, losses = best_members(teacher, trial, fm["kept"], fm["groups"], job.windows, batch_size=opts.batch_size,
                                 device=device, pooling=job.pooling, progress=progress)
    scores["share_member_losses"] = losses
    return picks


def _heal(folded: torch.nn.Module, teacher: torch.nn.Module, job: _Job, opts: FoldOptions, *, seed: int, device,
          progress: ProgressFn | None, gathered: dict, keep_teacher: bool) -> dict:
    """The heal of ``folded`` from ``teacher`` as ``opts`` says (LoRA adapters left unmerged; sharded: the whole
    weights into ``gathered`` on rank 0); returns its report."""
    from .heal import heal
    from .shard import fsdp_requested

    return heal(folded, teacher, job.heal_data(opts), steps=opts.heal_steps, lr=opts.heal_lr, tail=opts.heal_tail,
                pooled_weight=opts.heal_pooled_weight, splice=opts.heal_splice, batch_size=opts.batch_size,
                lora_rank=opts.heal_lora, seed=seed, device=device, pooling=job.pooling, progress=progress, merge=False,
                sharded=fsdp_requested(opts.fsdp) and Ranks.start(device).world > 1, gathered=gathered,
                teacher_cache=opts.teacher_cache, keep_teacher=keep_teacher, optimizer=opts.heal_optimizer,
                recompute=opts.heal_recompute)


def _healed_model(folded: torch.nn.Module, config: dict, opts: FoldOptions, gathered: dict) -> torch.nn.Module:
    """The model to write once the heal is done: adapters merged (new tensors, where the original's were just
    freed), or (sharded, rank 0) a plain folded model of the gathered weights."""
    from .format import assemble, folded_config

    if opts.heal_lora:
        merge_lora(folded)
    if not gathered:
        return folded
    fold_map = folded.config.weightsmith
    return assemble(folded_config(config, fold_map["kept"], fold_map), gathered)


def _check_inputs(model_path: Path, opts: FoldOptions) -> dict:
    """The model's config, once the data and the folder's format are known to suit a fold."""
    from ..checkpoint.formats import folder_format

    if not Path(opts.data).exists():
        raise WeightsmithError(f"{opts.data}: data file not found")
    fmt = folder_format(model_path)
    if fmt != "plain":
        raise WeightsmithError(f"{model_path}: already a {fmt} folder; fold a plain checkpoint")
    return read_json(model_path / "config.json", "config.json")


def _claim_output(ranks: Ranks, out: str | Path, model_path: Path, force: bool, opts: FoldOptions) -> None:
    """Rank 0 checks and locks the output for the run; the other ranks stop with its refusal. Every rank first
    checks that the heal's batches split evenly across the ranks."""
    if opts.heal_steps and opts.batch_size % ranks.world:
        raise OptionError("batch_size", f"{opts.batch_size} must be a multiple of the {ranks.world} processes "
                                        "(each rank heals on an equal share of every batch)")
    refused = None
    if ranks.rank == 0:
        try:
            check_output(out, [model_path], force)
        except WeightsmithError as exc:
            refused = str(exc)
    refused = ranks.from_rank0(refused)
    if refused:
        raise WeightsmithError(refused)


def _load(model_path: Path, device, dtype: str | None) -> torch.nn.Module:
    from ..loading import load

    return load(model_path, device=device, dtype=dtype)  # as stored unless ``dtype`` says: never upcast whole


@dataclass
class _Job:
    """What the fold works from: the block count, how many go, the group sizes and the calibration windows."""
    n: int
    k: int
    sizes: list[int]
    windows: torch.Tensor
    pooling: Pooling | None
    tokenizer: object
    seq: int

    def heal_data(self, opts: FoldOptions):
        """What the heal trains on (``heal_calibration``), ``heal_max_tokens`` of it."""
        same = opts.heal_max_tokens in (None, opts.max_tokens)
        return heal_calibration(self.tokenizer, opts.data, self.seq, opts.heal_max_tokens or opts.max_tokens,
                                self.pooling is None, self.windows if same else None)


def _prepare(model_path: Path, teacher: torch.nn.Module, opts: FoldOptions) -> _Job:
    from ..eval import load_tokenizer

    n = len(block_list(teacher))
    k = removal_count(opts.remove, n)
    if k >= n:
        raise OptionError("remove", f"{opts.remove} would remove all {n} blocks")
    sizes = parse_share(opts.share, n - k)
    causal = is_causal_lm(teacher)
    encoder_only = [name for name in ("heal_pooled_weight", "heal_splice")
                    if getattr(opts, name) != FoldOptions.default(name)]
    if causal and encoder_only:
        raise OptionError(encoder_only[0], f"{getattr(opts, encoder_only[0])} applies to encoders (sentence "
                                           "embeddings); this model is a causal LM")
    pooling = None if causal else read_pooling(model_path)
    seq = model_seq(teacher, opts.seq_len)
    tok = load_tokenizer(model_path)
    windows = calibration_windows(tok, opts.data, seq_len=seq, max_tokens=opts.max_tokens, causal=causal)
    return _Job(n, k, sizes, windows, pooling, tok, seq)


def _write(folded: torch.nn.Module, config: dict, fold_map: dict, result: dict, opts: FoldOptions,
           out: str | Path, model_path: Path, *, seed: int, processes: int, force: bool) -> None:
    """The folded folder, atomically: weights, side files and a model card recording ``opts``."""
    from .format import folded_config, save

    cfg = folded_config(config, fold_map["kept"], {k: v for k, v in fold_map.items() if k != "format"})
    with output_folder(out, inputs=[model_path], force=force, stage="fold") as tmp:
        save(folded.to("cpu"), tmp, cfg, opts.out_shard_size)
        copy_side_files(model_path, tmp)
        copy_sentence_transformers_files(model_path, tmp)
        params = {**opts.to_dict(exclude=("out_shard_size",)), "heal_max_tokens": opts.heal_max_tokens or opts.max_tokens,
                  "seed": seed, "processes": processes}
        write_model_card(tmp, stage="fold", method=f"FoldGPT ({opts.importance} importance)",
                         inputs=[str(model_path)], parameters=params,
                         metrics=[{"model": Path(out).name, "blocks": len(fold_map["kept"]),
                                   "removed": str(result["removed"]), "unique_params": result["params_unique"],
                                   "original_params": result["params_original"]}],
                         notes="Blocks in a group share one set of weights (stored once); load with "
                               "`weightsmith.load`, or flatten with `weightsmith export --plain`.")
