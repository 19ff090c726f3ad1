"""Perplexity of STABLE-RPS vs ROAST vs magnitude pruning vs a smaller dense model at equal memory.

Budgets are stored values / original parameters of the compressed modules (every nn.Linear in
the blocks of the zoo LM). Pruning pays for its indices: a kept value costs one slot plus the
cheaper of an int32 index (one more slot) or a bitmask over the module (n/32 slots in all).
(a) project the trained zoo 'base' model, then heal for --heal-steps; (b) train from scratch for
--scratch-steps on the same tokens. Usage: python bench/rps_quality.py [--budgets 0.5 0.2 0.1 0.05]
"""
from __future__ import annotations

import argparse
import json
import math
import time

import torch
from torch import nn

from weightsmith.compressor.project import compress_model, init_model, select_modules
from weightsmith.compressor.train import fit
from weightsmith.eval import load_tokenizer, perplexity
from weightsmith.loading import load
from weightsmith.zoo import build, corpus


def pruning_keep(budget: float, n: int) -> int:
    """Values a pruned module may keep when its index overhead is paid from the same budget."""
    return max(1, int(max(budget * n / 2, budget * n - n / 32)))


class MagnitudeMask:
    """Unstructured magnitude pruning per module, fixed or ramped up (gradual pruning while training)."""

    def __init__(self, modules: list[nn.Linear], budget: float, ramp_steps: int = 0, every: int = 10):
        self.modules, self.budget, self.ramp, self.every, self.step = modules, budget, ramp_steps, every, 0
        self.masks = [torch.ones_like(m.weight, dtype=torch.bool) for m in modules]
        self.update(final=ramp_steps == 0)

    @torch.no_grad()
    def update(self, final: bool) -> None:
        frac = 1.0 if final else min(1.0, self.step / self.ramp)
        for i, m in enumerate(self.modules):
            n = m.weight.numel()
            keep = round(n - frac * (n - pruning_keep(self.budget, n)))
            thresh = m.weight.abs().reshape(-1).kthvalue(n - keep + 1).values if keep < n else -1.0
            self.masks[i] = m.weight.abs() >= thresh
            m.weight.mul_(self.masks[i])

    @torch.no_grad()
    def __call__(self) -> None:
        self.step += 1
        if self.ramp and self.step <= self.ramp and self.step % self.every == 0:
            self.update(final=self.step >= self.ramp)
        for m, mask in zip(self.modules, self.masks):
            m.weight.mul_(mask)


def small_dense_config(config, target_params: int):
    """The same architecture with hidden/intermediate shrunk until its parameters fit ``target_params``."""
    from transformers import LlamaConfig, LlamaForCausalLM

    best = None
    for hidden in range(8, config.hidden_size + 1, 8):
        cfg = LlamaConfig(**{**config.to_dict(), "hidden_size": hidden,
                             "intermediate_size": round(hidden * config.intermediate_size / config.hidden_size)})
        with torch.device("meta"):
            n = sum(p.numel() for p in LlamaForCausalLM(cfg).parameters())
        if n <= target_params:
            best = (cfg, n)
    return best


def run(budgets=(0.5, 0.2, 0.1, 0.05), heal_steps=50, scratch_steps=120, batch=16, seq=64, lr_heal=1e-3,
        lr_scratch=4e-3, eval_tokens=2000, seed=0, log=print) -> list[dict]:
    from transformers import LlamaForCausalLM

    zoo = build("tiny")
    base = zoo.model("base")
    tok = load_tokenizer(base)
    train_ids = torch.tensor(tok(corpus.split_text("general", "train", 400_000), add_special_tokens=False)["input_ids"])
    valid = torch.tensor(tok(zoo.data("general", "valid").read_text(), add_special_tokens=False)["input_ids"])[:eval_tokens]

    def ppl(model):
        return perplexity(model, valid, context=256, stride=128)["perplexity"]

    def train(model, steps, lr, after=None):
        return fit(model, train_ids, steps=steps, lr=lr, batch_size=batch, seq_len=seq, seed=seed, after_step=after)

    dense = load(base)
    config = dense.config
    chosen = select_modules(dense, None)
    compressed = sum(m.weight.numel() for _, m in chosen)
    other = sum(p.numel() for p in dense.parameters()) - compressed
    rows = [{"setting": "reference", "method": "dense base (trained 500 steps)", "budget": 1.0,
             "stored": other + compressed, "perplexity": ppl(dense)}]
    torch.manual_seed(seed)
    scratch_dense = LlamaForCausalLM(config)
    train(scratch_dense, scratch_steps, lr_scratch)
    rows.append({"setting": "scratch", "method": "dense full size", "budget": 1.0, "stored": other + compressed,
                 "perplexity": ppl(scratch_dense)})
    log(rows[-2]), log(rows[-1])
    for b in budgets:
        stored = other + round(b * compressed)
        for mapping in ("stable", "roast"):
            t = time.time()
            model = load(base)
            _, st = compress_model(model, budget=b, mapping=mapping, seed=seed)
            before = ppl(model)
            train(model, heal_steps, lr_heal)
            rows.append({"setting": "project+heal", "method": mapping, "budget": b, "stored": stored,
                         "perplexity_projected": before, "perplexity": ppl(model),
                         "relative_error": st["relative_error"], "seconds": round(time.time() - t, 1)})
            log(rows[-1])
        model = load(base)
        mask = MagnitudeMask([m for _, m in select_modules(model, None)], b)
        before = ppl(model)
        train(model, heal_steps, lr_heal, mask)
        rows.append({"setting": "project+heal", "method": "magnitude pruning", "budget": b, "stored": stored,
                     "perplexity_projected": before, "perplexity": ppl(model)})
        log(rows[-1])

        for mapping in ("stable", "roast"):
            torch.manual_seed(seed)
            model = LlamaForCausalLM(config)
            init_model(model, budget=b, mapping=mapping, seed=seed)
            train(model, scratch_steps, lr_scratch)
            rows.append({"setting": "scratch", "method": mapping, "budget": b, "stored": stored,
                         "perplexity": ppl(model)})
            log(rows[-1])
        torch.manual_seed(seed)
        model = LlamaForCausalLM(config)
        mask = MagnitudeMask([m for _, m in select_modules(model, None)], b, ramp_steps=scratch_steps // 2)
        train(model, scratch_steps, lr_scratch, mask)
        rows.append({"setting": "scratch", "method": "gradual magnitude pruning", "budget": b, "stored": stored,
                     "perplexity": ppl(model)})
        log(rows[-1])
        small = small_dense_config(config, stored)
        if small is not None:
            torch.manual_seed(seed)
            model = LlamaForCausalLM(small[0])
            train(model, scratch_steps, lr_scratch)
            rows.append({"setting": "scratch", "method": f"dense hidden {small[0].hidden_size}", "budget": b,
                         "stored": small[1], "perplexity": ppl(model)})
            log(rows[-1])
    return rows


def markdown(rows: list[dict]) -> str:
    lines = ["| setting | method | budget | stored params | perplexity |", "|---|---|---|---|---|"]
    for r in rows:
        p = f"{r['perplexity']:.1f}" if math.isfinite(r["perplexity"]) else "diverged"
        lines.append(f"| {r['setting']} | {r['method']} | {r['budget']:g} | {r['stored']:,} | {p} |")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--budgets", type=float, nargs="+", default=[0.5, 0.2, 0.1, 0.05])
    ap.add_argument("--heal-steps", type=int, default=50)
    ap.add_argument("--scratch-steps", type=int, default=120)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--json", type=str, default=None, help="also write the rows to this file")
    args = ap.parse_args()
    t = time.time()
    rows = run(tuple(args.budgets), args.heal_steps, args.scratch_steps, seed=args.seed,
               log=lambda r: print(json.dumps(r), flush=True))
    print(markdown(rows))
    print(f"total {time.time() - t:.0f} s")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=2)


if __name__ == "__main__":
    main()
