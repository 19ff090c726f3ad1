"""Heal a folded model (FoldGPT): a short fine-tune with tail-layer distillation from the original.

loss = lm_weight * LM loss + kd_weight * T^2 KL(teacher || student at temperature T)
       + mse_weight * mean over the last ``tail`` hidden states of MSE(student, teacher)
Only the blocks train by default. The student's i-th hidden state from the end is matched to the teacher's i-th from the end.
Encoders (no logits) use the hidden-state term alone. Runs through ``accelerate`` (one or many GPUs).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from ..progress import ProgressFn, report
from .blocks import block_list, is_causal_lm


def heal(student: torch.nn.Module, teacher: torch.nn.Module, windows: torch.Tensor, *, steps: int = 200,
         lr: float = 3e-4, batch_size: int = 8, tail: int = 2, lm_weight: float = 1.0, kd_weight: float = 1.0,
         mse_weight: float = 1.0, temperature: float = 2.0, blocks_only: bool = True, seed: int = 0, device: str | torch.device = "cpu",
         progress: ProgressFn | None = None) -> dict:
    """Train ``student`` in place; returns the first and last losses."""
    from accelerate import Accelerator

    dev = torch.device(device)
    accelerator = Accelerator(cpu=dev.type == "cpu")
    teacher.eval()
    for p in teacher.parameters():
        p.requires_grad_(False)
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
    for p in student.parameters():
        p.requires_grad_(True)
    return {"heal_steps": steps, "heal_loss_first": losses[0] if losses else None,
            "heal_loss_last": sum(losses[-10:]) / len(losses[-10:]) if losses else None}
