"""FoldGPT block importance by learnable gates: block i computes x + g_i * F_i(x) on each residual
branch (attention and MLP share the block's gate), base weights frozen, gates trained on calibration data.

Objective (the paper's exact penalty is not published; this is weightsmith's reading):
  L = L_task + lambda_budget * |sum_i g_i - K| / N + lambda_polar(t) * mean_i g_i (1 - g_i)
with g_i = sigmoid(a_i), K = blocks to keep, lambda_polar ramped linearly from 0 so gates first find
their order under the budget, then polarise to 0/1. L_task is the LM loss for causal LMs and
1 - cos(last hidden state, ungated last hidden state) for encoders. Blocks with the lowest gates go.
"""
from __future__ import annotations

import torch

from ..progress import ProgressFn, report
from .blocks import block_list, branch_modules, is_causal_lm, scale_output


def gate_importance(model: torch.nn.Module, windows: torch.Tensor, keep: int, *, steps: int = 200, lr: float = 0.05,
                    batch_size: int = 8, lambda_budget: float = 1.0, lambda_polar: float = 1.0, init: float = 3.0,
                    seed: int = 0, device: str | torch.device = "cpu",
                    progress: ProgressFn | None = None) -> list[float]:
    """Trained gate value per block (1 = needed, 0 = removable)."""
    blocks = block_list(model)
    n = len(blocks)
    logits = torch.nn.Parameter(torch.full((n,), init, device=device))
    frozen = [p.requires_grad for p in model.parameters()]
    for p in model.parameters():
        p.requires_grad_(False)
    causal = is_causal_lm(model)
    gated = [True]  # off while computing the encoders' ungated target

    def hook(i):
        return lambda m, a, out: scale_output(out, torch.sigmoid(logits[i])) if gated[0] else out

    handles = [mod.register_forward_hook(hook(i)) for i, b in enumerate(blocks) for mod in branch_modules(model, b)]
    opt = torch.optim.Adam([logits], lr=lr)
    gen = torch.Generator().manual_seed(seed)
    was_training = model.training
    model.eval()
    try:
        for step in range(steps):
            x = windows[torch.randint(0, windows.shape[0], (batch_size,), generator=gen)].to(device)
            if causal:
                task = model(input_ids=x, labels=x).loss
            else:
                gated[0] = False
                with torch.no_grad():
                    target = model(input_ids=x).last_hidden_state
                gated[0] = True
                out = model(input_ids=x).last_hidden_state
                task = 1 - torch.nn.functional.cosine_similarity(out, target, dim=-1).mean()
            g = torch.sigmoid(logits)
            ramp = min(1.0, step / max(1, steps // 2))
            loss = task + lambda_budget * (g.sum() - keep).abs() / n + lambda_polar * ramp * (g * (1 - g)).mean()
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            report(progress, "gates", step + 1, steps)
    finally:
        for h in handles:
            h.remove()
        for p, r in zip(model.parameters(), frozen):
            p.requires_grad_(r)
        model.train(was_training)
    return torch.sigmoid(logits).detach().cpu().tolist()


def lowest(scores: list[float], k: int) -> list[int]:
    return sorted(sorted(range(len(scores)), key=lambda i: scores[i])[:k])
