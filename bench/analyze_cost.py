"""Cost of ``analyze`` against one plain forward pass with hidden states on the same tokens (target <= 1.2x).

    .venv/bin/python bench/analyze_cost.py [--model PATH] [--data TEXT] [--max-tokens 4096] [--repeats 3]

Both sides load the model and tokenize beforehand; timed: forward(+hooks) and the metrics.
"""
from __future__ import annotations

import argparse
import time

import torch

import weightsmith
from weightsmith.eval import load_tokenizer
from weightsmith.fold.analyze import block_similarity, similarity_report
from weightsmith.fold.blocks import is_causal_lm
from weightsmith.data import calibration_windows
from weightsmith.fold.data import model_seq
from weightsmith.zoo import build, minilm_path


def best_of(fn, repeats):
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return min(times)


def measure(path, data, max_tokens, repeats, batch_size=8):
    model = weightsmith.load(path)
    windows = calibration_windows(load_tokenizer(path), data, seq_len=model_seq(model, None), max_tokens=max_tokens,
                                  causal=is_causal_lm(model))

    @torch.no_grad()
    def plain():
        for s in range(0, windows.shape[0], batch_size):
            model(input_ids=windows[s:s + batch_size], output_hidden_states=True)

    def analyze():
        similarity_report(block_similarity(model, windows, batch_size=batch_size), remove=1)

    plain()
    t_plain, t_analyze = best_of(plain, repeats), best_of(analyze, repeats)
    print(f"| {path.name} | {windows.numel()} | {t_plain * 1000:.0f} ms | {t_analyze * 1000:.0f} ms | "
          f"{t_analyze / t_plain:.2f}x |", flush=True)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default=None)
    ap.add_argument("--data", default=None)
    ap.add_argument("--max-tokens", type=int, default=4096)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--threads", type=int, default=1, help="torch CPU threads (1 = steady timings on shared cores)")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    zoo = build("tiny")
    data = args.data or zoo.data("general", "calib")
    print(f"torch threads: {torch.get_num_threads()}")
    print("| model | tokens | forward + hidden states | analyze (forward + metrics) | ratio |")
    print("|---|---|---|---|---|")
    from pathlib import Path
    paths = [Path(args.model)] if args.model else [zoo.model("base"), minilm_path()]
    for p in paths:
        measure(p, data, args.max_tokens, args.repeats)


if __name__ == "__main__":
    main()
