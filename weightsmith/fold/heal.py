"""Heal a folded model (FoldGPT): a short fine-tune with tail-layer distillation from the original.

loss = lm_weight * LM loss + kd_weight * T^2 KL(teacher || student at temperature T)
       + mse_weight * mean over the last ``tail`` hidden states of MSE(student, teacher)
Only the blocks train by default. The student's i-th hidden state from the end is matched to the teacher's i-th from the end.
Encoders (no logits) heal on what they are for: the hidden-state term plus pooled_weight * (1 - cos) of the
sentence embedding (the folder's sentence-transformers pooling) to the original's; each step's sentences
run in groups of similar length (gradients accumulated), not as one batch padded to its longest. With
``splice`` a share of each batch is new inputs, the start of one sentence joined to the end of another, so
the student matches the original off the calibration sentences too (distillation's function matching). Runs through
``accelerate``: under ``accelerate launch`` each rank trains on its own slice of every batch (data-parallel,
or sharded with FSDP: ``shard``).

With ``lora_rank`` the blocks stay frozen and peft LoRA adapters on their linear layers train instead.
Layers that share one weight (a fold group) share one adapter too, so merging the adapters back into
the weights afterwards is exact and keeps the sharing: the folded model comes out in the same format.
"""
from __future__ import annotations

import functools
from contextlib import contextmanager

import torch
import torch.nn.functional as F

from ..errors import OptionError
from ..progress import ProgressFn, report
from ..data import Sentences
from ..training import lr_at
from .blocks import block_list, is_causal_lm
from ..pooling import Pooling
from .teacher_cache import TeacherCache


def add_lora(model: torch.nn.Module, rank: int, alpha: float | None = None) -> list[torch.nn.Parameter]:
    """Inject peft LoRA adapters into every linear layer of the blocks; layers sharing a weight share
    one adapter. Returns the adapters' parameters (the only ones left trainable)."""
    from peft import LoraConfig, inject_adapter_in_model
    from peft.tuners.lora import Linear as LoraLinear

    blocks = block_list(model)
    prefix = next(name for name, mod in model.named_modules() if mod is blocks)
    targets = [name for name, mod in model.named_modules()
               if name.startswith(prefix + ".") and isinstance(mod, torch.nn.Linear)]
    for p in model.parameters():
        p.requires_grad_(False)
    inject_adapter_in_model(LoraConfig(r=rank, lora_alpha=alpha or 2 * rank, lora_dropout=0.0, target_modules=targets),
                            model)
    first: dict[int, LoraLinear] = {}
    for mod in model.modules():
        if isinstance(mod, LoraLinear):
            owner = first.setdefault(id(mod.base_layer.weight), mod)
            if owner is not mod:
                for name in mod.active_adapters:
                    mod.lora_A[name].weight = owner.lora_A[name].weight
                    mod.lora_B[name].weight = owner.lora_B[name].weight
    return [p for p in model.parameters() if p.requires_grad]  # parameters() lists a shared one once


@torch.no_grad()
def merge_lora(model: torch.nn.Module) -> int:
    """Put the plain layers back, each weight (once per shared weight) a new tensor: weight + the adapters' delta,
    in the weight's dtype. New tensors, not in-place sums: a weight may be the teacher's own storage
    (``plan.fold_model`` shares it). Returns the number of weights changed."""
    from peft.tuners.lora import Linear as LoraLinear

    merged: dict[int, torch.nn.Parameter] = {}
    for parent in list(model.modules()):
        for child_name, child in list(parent.named_children()):
            if isinstance(child, LoraLinear):
                base = child.base_layer
                key = id(base.weight)
                if key not in merged:
                    w = base.weight.to(torch.float32, copy=True)
                    for name in child.active_adapters:
                        w += child.get_delta_weight(name).float()
                    merged[key] = torch.nn.Parameter(w.to(base.weight.dtype), requires_grad=base.weight.requires_grad)
                    del w
                base.weight = merged[key]
                setattr(parent, child_name, base)
    return len(merged)


def own_storage(params: list[torch.nn.Parameter], teacher: torch.nn.Module) -> None:
    """Give each trainable parameter that shares its storage with the teacher a copy of its own (the heal
    changes it in place; the teacher must stay the original)."""
    held = {p.untyped_storage().data_ptr() for p in teacher.parameters()}
    for p in params:
        if p.untyped_storage().data_ptr() in held:
            p.data = p.data.clone()


def heal(student: torch.nn.Module, teacher: torch.nn.Module, windows: torch.Tensor | Sentences, *, steps: int = 200,
         lr: float = 3e-4, batch_size: int = 8, tail: int = 2, lm_weight: float = 1.0, kd_weight: float = 1.0,
         mse_weight: float = 1.0, pooled_weight: float = 1.0, temperature: float = 2.0, blocks_only: bool = True,
         lora_rank: int = 0, splice: float = 0.0, seed: int = 0, device: str | torch.device = "cpu",
         pooling: Pooling | None = None, progress: ProgressFn | None = None, merge: bool = True,
         sharded: bool = False, gathered: dict | None = None, teacher_cache: bool = False,
         keep_teacher: bool = True, optimizer: str = "adamw", recompute: bool = False) -> dict:
    """Train ``student`` in place (``optimizer``: AdamW or Adafactor; 10% linear warmup, then cosine decay to
    0.1·lr); returns the first and last losses and what each rank did.

    ``windows``: [n, seq] token windows, or (encoders) ``Sentences``, separate inputs padded per batch;
    ``splice``: the share of each batch of sentences replaced by spliced ones (``Sentences.spliced``);
    ``merge``: merge LoRA adapters into the weights at the end (``merge_lora``; a caller that drops the teacher
    first merges with less memory); ``sharded``: FSDP across the launched processes (``shard.Sharded``), rank 0
    then finds the whole trained weights in ``gathered`` (the student keeps only its shards); ``teacher_cache``:
    the teacher's outputs on every window computed once (``TeacherCache``), each step runs the student alone;
    ``recompute``: each block's activations recomputed in the backward pass (``recomputed``);
    ``keep_teacher=False``: the caller has no use for the teacher afterwards, so that with the cache the student
    trains the tensors it shares with the teacher in place instead of a copy.

    Every rank draws the same global batch of ``batch_size`` windows and trains on its own equal slice;
    the gradients are averaged across ranks, so N processes take the steps one process would.
    """
    from .ranks import Ranks, launched
    from .shard import Replicated, Sharded

    _check(windows, splice=splice, sharded=sharded, lora_rank=lora_rank, teacher_cache=teacher_cache)
    engine = (Sharded if sharded else Replicated)(torch.device(device))
    ranks = Ranks.start(device) if launched() else Ranks()
    if batch_size % ranks.world:
        raise OptionError("batch_size", f"{batch_size} must be a multiple of the {ranks.world} processes")
    _freeze(teacher)
    model = student
    causal = is_causal_lm(model)
    cache = TeacherCache(teacher, windows, tail=tail, causal=causal, batch_size=batch_size, device=engine.device,
                         progress=progress) if teacher_cache else None
    params = _trainable(student, lora_rank, blocks_only)
    if not engine.sharded and (cache is None or keep_teacher):
        own_storage(params, teacher)
    student, teacher, opt, params = engine.prepare(student, None if cache else teacher, params, lr, optimizer)
    loss_kw = dict(causal=causal, tail=tail, lm_weight=lm_weight, kd_weight=kd_weight, mse_weight=mse_weight,
                   pooled_weight=pooled_weight, temperature=temperature, pooling=pooling or Pooling())
    student.eval()  # dropout off: the student matches the teacher's deterministic outputs
    with recomputed(model, recompute):
        losses, grad_norms, first_windows = _steps(engine, student, teacher, opt, params, windows, cache, ranks,
                                                   steps=steps, lr=lr, batch_size=batch_size, splice=splice,
                                                   seed=seed, progress=progress, **loss_kw)
    held = _held(student, opt)
    student.eval()
    if engine.sharded and gathered is not None:
        gathered.update(engine.gather(student, ranks.rank))
    if lora_rank and merge:
        merge_lora(model)
    for p in model.parameters():
        p.requires_grad_(True)
    return _heal_report(steps, lora_rank, losses, grad_norms, first_windows, ranks, held)


@contextmanager
def recomputed(model: torch.nn.Module, on: bool):
    """While the context is open, each of ``model``'s blocks keeps only its input for the backward pass and runs
    its forward again there (activation checkpointing): the same gradients, bit for bit, for one more forward pass
    per step, and one block's activations held instead of every block's."""
    from torch.utils.checkpoint import checkpoint

    blocks = list({id(b): b for b in block_list(model)}.values()) if on else []  # a shared block wrapped once
    for block in blocks:
        block.forward = functools.partial(checkpoint, block.forward, use_reentrant=False)
    try:
        yield
    finally:
        for block in blocks:
            del block.forward


def _check(windows, *, splice: float, sharded: bool, lora_rank: int, teacher_cache: bool) -> None:
    if splice and not isinstance(windows, Sentences):
        raise OptionError("heal_splice", f"{splice} needs sentences (encoders); token windows cannot be spliced")
    if sharded and lora_rank:
        raise OptionError("heal_lora", "LoRA adapters are small: heal them data-parallel, without sharding")
    if teacher_cache and isinstance(windows, Sentences):
        raise OptionError("teacher_cache", "caches token windows; sentences (encoders) are batched by length")


def _steps(engine, student, teacher, opt, params, windows, cache, ranks, *, steps: int, lr: float, batch_size: int,
           splice: float, seed: int, progress: ProgressFn | None, **loss_kw) -> tuple[list, list, list]:
    """The heal's steps; returns this rank's losses and gradient norms, and the windows of its first batch."""
    gen = torch.Generator().manual_seed(seed)
    per_rank = batch_size // ranks.world
    losses, grad_norms, first_windows = [], [], []
    for step in range(steps):
        for g in opt.param_groups:
            g["lr"] = lr_at(step, steps, lr, max(1, steps // 10))
        drawn = torch.randint(0, len(windows), (batch_size,), generator=gen)
        data = windows.spliced(drawn.tolist(), splice, gen) if splice else windows
        mine = slice(ranks.rank * per_rank, (ranks.rank + 1) * per_rank)
        idx = (torch.arange(batch_size) if splice else drawn)[mine]  # spliced: positions in the new batch
        if step == 0:
            first_windows = drawn[mine].tolist()
        opt.zero_grad(set_to_none=True)
        cached = cache.outputs(idx, engine.device) if cache else None
        losses.append(_accumulate(engine, student, teacher, _parts(data, idx), cached, **loss_kw))
        grad_norms.append(engine.clip(params, 1.0))
        opt.step()
        report(progress, "heal", step + 1, steps)
    return losses, grad_norms, first_windows


def _held(student: torch.nn.Module, opt) -> dict:
    """What this rank holds after the last step: tensor bytes of parameters, gradients and optimizer states, and
    its peak RSS so far."""
    import resource

    from .shard import state_bytes

    return {**state_bytes(student, opt), "peak_rss": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024}


def _accumulate(engine, student, teacher, parts: list[tuple], cached, **loss_kw) -> float:
    """Backward through each part of one step's batch (the gradients add up; ranks reduce them once, after the
    last part); returns the batch's loss. ``cached``: the teacher's outputs on the batch (token windows: one
    part)."""
    loss = 0.0
    for j, (x, mask, rows, tokens) in enumerate(parts):
        x, mask = x.to(engine.device), None if mask is None else mask.to(engine.device)
        with engine.no_sync(student, last=j + 1 == len(parts)):
            part = distill_loss(student, teacher, x, mask, rows=rows, tokens=tokens, teacher_out=cached, **loss_kw)
            engine.backward(part)
        loss += part.item()
    return loss


def _parts(windows: torch.Tensor | Sentences, idx: torch.Tensor) -> list[tuple]:
    """One step's batch as (inputs, mask, share of its rows, share of its real tokens) parts: token windows whole;
    sentences in groups of similar length (``Sentences.groups``), so that little of the work is padding. The
    parts' losses, weighted by those shares, add up to the loss of the whole batch padded at once."""
    if not isinstance(windows, Sentences):
        return [(windows[idx], None, 1.0, 1.0)]
    groups = windows.groups(idx.tolist())
    total = sum(len(windows.ids[i]) for g in groups for i in g)
    return [(*windows.batch(g), len(g) / len(idx), sum(len(windows.ids[i]) for i in g) / total) for g in groups]


def _trainable(student: torch.nn.Module, lora_rank: int, blocks_only: bool) -> list[torch.nn.Parameter]:
    """The parameters the heal trains: LoRA adapters, or the blocks' weights (all weights without ``blocks_only``)."""
    if lora_rank:
        return add_lora(student, lora_rank)
    if blocks_only:  # embeddings and head stay as the original trained them: less to overfit on small calibration sets
        for p in student.parameters():
            p.requires_grad_(False)
        for p in block_list(student).parameters():
            p.requires_grad_(True)
    return [p for p in student.parameters() if p.requires_grad]


def _freeze(teacher: torch.nn.Module) -> None:
    teacher.eval()
    for p in teacher.parameters():
        p.requires_grad_(False)


def _heal_report(steps: int, lora_rank: int, losses: list[float], grad_norms: list[float], first_windows: list[int],
                 ranks, held: dict) -> dict:
    """What ``heal`` returns: the loss curve (the mean over the ranks: one process's curve), the first and last
    losses, and what each rank did and held."""
    trace = {"rank": ranks.rank, "first_windows": first_windows, "loss_first": losses[0] if losses else None,
             "grad_norm_last": grad_norms[-1] if grad_norms else None, "held": held}
    curve = ranks.mean(losses)
    return {"heal_steps": steps, "heal_lora_rank": lora_rank, "heal_loss_first": curve[0] if curve else None,
            "heal_loss_last": sum(curve[-10:]) / len(curve[-10:]) if curve else None, "heal_losses": curve,
            "heal_ranks": ranks.gather(trace)}


def _mse(a: torch.Tensor, b: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    """Mean squared error over the real tokens (all of them without a mask)."""
    if mask is None:
        return F.mse_loss(a, b)
    m = mask.unsqueeze(-1).to(a.dtype)
    return ((a - b) ** 2 * m).sum() / (m.sum() * a.shape[-1])


def distill_loss(student: torch.nn.Module, teacher: torch.nn.Module, x: torch.Tensor, mask: torch.Tensor | None = None,
                 *, causal: bool, tail: int, lm_weight: float, kd_weight: float, mse_weight: float,
                 pooled_weight: float, temperature: float, pooling: Pooling, rows: float = 1.0,
                 tokens: float = 1.0, teacher_out=None) -> torch.Tensor:
    """The heal objective on one batch (see the module docstring); ``mask``: the padding of encoder inputs.
    A part of a larger batch passes its share of the batch's ``rows`` and real ``tokens``, which weigh the
    per-sentence and per-token means, so that the parts' losses add up to the whole batch's. ``teacher_out``:
    the teacher's outputs on ``x`` already computed (``TeacherCache``)."""
    extra = {} if mask is None else {"attention_mask": mask}
    t_out = teacher_out
    if t_out is None:
        with torch.no_grad():
            t_out = teacher(input_ids=x, output_hidden_states=True, **extra)
    s_out = student(input_ids=x, output_hidden_states=True, labels=x if causal and lm_weight else None, **extra)
    k = min(tail, len(s_out.hidden_states) - 1)
    loss = tokens * mse_weight * sum(_mse(s_out.hidden_states[-1 - i], t_out.hidden_states[-1 - i], mask)
                                     for i in range(k)) / k
    if causal:
        t = temperature
        kd = F.kl_div(F.log_softmax(s_out.logits / t, -1), F.log_softmax(t_out.logits / t, -1),
                      log_target=True, reduction="batchmean") * t * t / x.shape[1]
        return loss + kd_weight * kd + (lm_weight * s_out.loss if lm_weight else 0)
    s_emb, t_emb = pooling(s_out.last_hidden_state.float(), mask), pooling(t_out.last_hidden_state.float(), mask)
    return loss + rows * pooled_weight * (1 - F.cosine_similarity(s_emb, t_emb, dim=-1)).mean()
