"""FoldGPT block importance by learnable gates whose training experiences removed configurations.

Block i computes x + z_i (B_i(x) - x), B_i the whole block: z_i = 0 removes the block and z_i = 1 keeps it,
for pre-norm (Llama) and post-norm (BERT) blocks alike. z_i is a hard-concrete gate (Louizos, Welling and
Kingma 2018, L0 relaxation): z = clamp(sigmoid((log u - log(1 - u) + a_i) / beta) (r - l) + l, 0, 1) with
u ~ U(0, 1), beta = 2/3, (l, r) = (-0.1, 1.1). Every step samples a configuration in which blocks are
partly or fully off, so the task loss's gradient on a_i measures what taking block i out costs (a
deterministic gate at 1 only sees a small rescaling, and an encoder's distance to its own output has zero
gradient there). Base weights are frozen; only the log-odds a_i train (Adam):

  L = L_task + lambda_budget * (sum_i P(z_i != 0) - K)^2,   P(z_i != 0) = sigmoid(a_i - beta log(-l / r))

with K the blocks to keep. A block that costs nothing when removed gets no push back against the budget
and sinks first. L_task: LM loss for causal LMs; 1 - cos of the pooled sentence embedding to the ungated
model's for encoders. The blocks with the lowest a_i go.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from ..progress import ProgressFn, report
from .blocks import block_list, first_tensor, is_causal_lm
from ..pooling import Pooling

BETA, LOW, HIGH = 2 / 3, -0.1, 1.1


def sample_gates(log_alpha: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    u = torch.rand(log_alpha.shape, generator=gen).clamp(1e-6, 1 - 1e-6).to(log_alpha.device)
    s = torch.sigmoid((torch.log(u) - torch.log1p(-u) + log_alpha) / BETA)
    return (s * (HIGH - LOW) + LOW).clamp(0.0, 1.0)


def keep_probability(log_alpha: torch.Tensor) -> torch.Tensor:
    return torch.sigmoid(log_alpha - BETA * math.log(-LOW / HIGH))


def gate_importance(model: torch.nn.Module, windows: torch.Tensor, keep: int, *, steps: int = 200, lr: float = 0.1,
                    batch_size: int = 8, lambda_budget: float = 5.0, init: float = 3.0, seed: int = 0,
                    device: str | torch.device = "cpu", pooling: Pooling | None = None,
                    progress: ProgressFn | None = None) -> list[float]:
    """Trained gate log-odds a_i per block (high = needed, low = removable)."""
    blocks = block_list(model)
    n = len(blocks)
    log_alpha = torch.nn.Parameter(torch.full((n,), float(init), device=device))
    frozen = [p.requires_grad for p in model.parameters()]
    for p in model.parameters():
        p.requires_grad_(False)
    causal = is_causal_lm(model)
    pool = pooling or Pooling()
    z: list[torch.Tensor | None] = [None]  # None while computing the encoders' ungated target

    def hook(i):
        def gate(mod, args, kwargs, out):
            if z[0] is None:
                return out
            x = args[0] if args else kwargs["hidden_states"]
            h = x + z[0][i] * (first_tensor(out) - x)
            return (h,) + tuple(out[1:]) if isinstance(out, tuple) else h
        return gate

    handles = [b.register_forward_hook(hook(i), with_kwargs=True) for i, b in enumerate(blocks)]
    opt = torch.optim.Adam([log_alpha], lr=lr)
    gen = torch.Generator().manual_seed(seed)
    was_training = model.training
    model.eval()
    try:
        for step in range(steps):
            x = windows[torch.randint(0, windows.shape[0], (batch_size,), generator=gen)].to(device)
            if causal:
                z[0] = sample_gates(log_alpha, gen)
                task = model(input_ids=x, labels=x, use_cache=False).loss
            else:
                z[0] = None
                with torch.no_grad():
                    target = pool(model(input_ids=x).last_hidden_state.float())
                z[0] = sample_gates(log_alpha, gen)
                out = pool(model(input_ids=x).last_hidden_state.float())
                task = 1 - F.cosine_similarity(out, target, dim=-1).mean()
            loss = task + lambda_budget * (keep_probability(log_alpha).sum() - keep) ** 2
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
    return log_alpha.detach().cpu().tolist()


def lowest(scores: list[float], k: int) -> list[int]:
    return sorted(sorted(range(len(scores)), key=lambda i: scores[i])[:k])
