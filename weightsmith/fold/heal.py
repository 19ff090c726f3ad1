"""Heal a folded model (FoldGPT): a short fine-tune with tail-layer distillation from the original.

loss = lm_weight * LM loss + kd_weight * T^2 KL(teacher || student at temperature T)
       + mse_weight * mean over the last ``tail`` hidden states of MSE(student, teacher)
Only the blocks train by default. The student's i-th hidden state from the end is matched to the teacher's i-th from the end.
Encoders (no logits) use the hidden-state term alone. Runs through ``accelerate`` (one or many GPUs).

With ``lora_rank`` the blocks stay frozen and peft LoRA adapters on their linear layers train instead.
Layers that share one weight (a fold group) share one adapter too, so merging the adapters back into
the weights afterwards is exact and keeps the sharing: the folded model comes out in the same format.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from ..progress import ProgressFn, report
from .blocks import block_list, is_causal_lm


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
    """Add every adapter's delta to its weight (once per shared weight) and put the plain layers back.
    Returns the number of weights changed."""
    from peft.tuners.lora import Linear as LoraLinear

    merged: set[int] = set()
    for parent in list(model.modules()):
        for child_name, child in list(parent.named_children()):
            if isinstance(child, LoraLinear):
                base = child.base_layer
                if id(base.weight) not in merged:
                    for name in child.active_adapters:
                        base.weight += child.get_delta_weight(name)
                    merged.add(id(base.weight))
                setattr(parent, child_name, base)
    return len(merged)


def heal(student: torch.nn.Module, teacher: torch.nn.Module, windows: torch.Tensor, *, steps: int = 200,
         lr: float = 3e-4, batch_size: int = 8, tail: int = 2, lm_weight: float = 1.0, kd_weight: float = 1.0,
         mse_weight: float = 1.0, temperature: float = 2.0, blocks_only: bool = True, lora_rank: int = 0,
         seed: int = 0, device: str | torch.device = "cpu", progress: ProgressFn | None = None) -> dict:
    """Train ``student`` in place; returns the first and last losses."""
    from accelerate import Accelerator

    dev = torch.device(device)
    accelerator = Accelerator(cpu=dev.type == "cpu")
    teacher.eval()
    for p in teacher.parameters():
        p.requires_grad_(False)
    model = student
    if lora_rank:
        params = add_lora(student, lora_rank)
    else:
        if blocks_only:  # embeddings and head stay as the original trained them: less to overfit on small calibration sets
            for p in student.parameters():
                p.requires_grad_(False)
            for p in block_list(student).parameters():
                p.requires_grad_(True)
        params = [p for p in student.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
    student, opt = accelerator.prepare(student, opt)
    teacher = teacher.to(accelerator.device)
    causal = is_causal_lm(teacher)
    gen = torch.Generator().manual_seed(seed)
    student.train()
    losses = []
    for step in range(steps):
        for g in opt.param_groups:
            g["lr"] = lr * min(1.0, (step + 1) / max(1, steps // 10))
        x = windows[torch.randint(0, windows.shape[0], (batch_size,), generator=gen)].to(accelerator.device)
        with torch.no_grad():
            t_out = teacher(input_ids=x, output_hidden_states=True)
        s_out = student(input_ids=x, output_hidden_states=True, labels=x if causal and lm_weight else None)
        k = min(tail, len(s_out.hidden_states) - 1)
        loss = mse_weight * sum(F.mse_loss(s_out.hidden_states[-1 - i], t_out.hidden_states[-1 - i]) for i in range(k)) / k
        if causal:
            t = temperature
            kd = F.kl_div(F.log_softmax(s_out.logits / t, -1), F.log_softmax(t_out.logits / t, -1),
                          log_target=True, reduction="batchmean") * t * t / x.shape[1]
            loss = loss + kd_weight * kd + (lm_weight * s_out.loss if lm_weight else 0)
        opt.zero_grad(set_to_none=True)
        accelerator.backward(loss)
        accelerator.clip_grad_norm_(params, 1.0)
        opt.step()
        losses.append(loss.item())
        report(progress, "heal", step + 1, steps)
    student.eval()
    if lora_rank:
        merge_lora(model)
    for p in model.parameters():
        p.requires_grad_(True)
    return {"heal_steps": steps, "heal_lora_rank": lora_rank, "heal_loss_first": losses[0] if losses else None,
            "heal_loss_last": sum(losses[-10:]) / len(losses[-10:]) if losses else None}
