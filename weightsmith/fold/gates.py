"""FoldGPT block importance by learnable gates: block i computes x + g_i * F_i(x) on each residual
branch (attention and MLP share the block's gate), base weights frozen, gates trained on calibration data.

Objective (the paper's exact penalty is not published; this is weightsmith's reading):
  L = L_task + lambda_budget * |sum_i g_i - K| / N + lambda_polar(t) * mean_i g_i (1 - g_i)
with g_i in [0, 1] (projected after each step), K = blocks to keep, and lambda_polar ramped from 0 over
the first half so gates first find their order under the budget, then polarise to 0/1. Plain SGD with
momentum keeps each gate's speed proportional to its gradient, so a block the loss does not need sinks
fastest (Adam would move every gate at about the same speed). L_task is the LM loss for causal LMs
and 1 - cos(last hidden state, ungated last hidden state) for encoders. The lowest gates go.
"""
from __future__ import annotations

import torch

from ..progress import ProgressFn, report
from .blocks import block_list, branch_modules, is_causal_lm, scale_output


def gate_importance(model: torch.nn.Module, windows: torch.Tensor, keep: int, *, steps: int = 200, lr: float = 0.02,
                    batch_size: int = 8, lambda_budget: float = 1.0, lambda_polar: float = 1.0,
                    seed: int = 0, device: str | torch.device = "cpu",
                    progress: ProgressFn | None = None) -> list[float]:
    """Trained gate value per block (1 = needed, 0 = removable)."""
    blocks = block_list(model)
    n = len(blocks)
    gates = torch.nn.Parameter(torch.ones(n, device=device))
    frozen = [p.requires_grad for p in model.parameters()]
    for p in model.parameters():
        p.requires_grad_(False)
    causal = is_causal_lm(model)
    gated = [True]  # off while computing the encoders' ungated target

    def hook(i):
        return lambda m, a, out: scale_output(out, gates[i]) if gated[0] else out

    handles = [mod.register_forward_hook(hook(i)) for i, b in enumerate(blocks) for mod in branch_modules(model, b)]
    opt = torch.optim.SGD([gates], lr=lr, momentum=0.9)
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
            g = gates
            ramp = min(1.0, step / max(1, steps // 2))
            loss = task + lambda_budget * (g.sum() - keep).abs() / n + lambda_polar * ramp * (g * (1 - g)).mean()
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            with torch.no_grad():
                gates.clamp_(0.0, 1.0)
            report(progress, "gates", step + 1, steps)
    finally:
        for h in handles:
            h.remove()
        for p, r in zip(model.parameters(), frozen):
            p.requires_grad_(r)
        model.train(was_training)
    return gates.detach().cpu().tolist()


def lowest(scores: list[float], k: int) -> list[int]:
    return sorted(sorted(range(len(scores)), key=lambda i: scores[i])[:k])
