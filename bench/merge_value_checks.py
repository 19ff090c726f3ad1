"""Cost of merge's value checks (NaN/inf in every input, non-finite or all-zero results): the same merges
of three random Llama folders with the checks on and with them bypassed, side by side.

    .venv/bin/python bench/merge_value_checks.py [--hidden 512] [--layers 4] [--repeats 3]
"""
from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import torch

from weightsmith.merge import merge
from weightsmith.merge.recipe import recipe_from_flags
from weightsmith.merge.values import ValueChecks
from weightsmith.zoo.synthetic import random_llama


def timed(recipe, out: Path, repeats: int) -> float:
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        merge(recipe, out, device="cpu", force=True)
        best = min(best, time.perf_counter() - start)
    return best


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--hidden", type=int, default=512)
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args()
    torch.set_num_threads(1)
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        cfg = dict(hidden_size=args.hidden, intermediate_size=4 * args.hidden, num_hidden_layers=args.layers,
                   vocab_size=8192, num_attention_heads=8, num_key_value_heads=8)
        folders = [str(random_llama(root / f"m{i}", seed=i, **cfg)) for i in range(3)]
        params = sum(p.numel() for p in __import__("weightsmith").load(folders[0]).parameters())
        print(f"3 random Llama folders, {params / 1e6:.1f}M float32 parameters each; best of {args.repeats}")
        print(f"{'method':<18}{'checks on (s)':>15}{'bypassed (s)':>15}{'ratio':>8}")
        for method, base in (("linear", None), ("task_arithmetic", folders[0]), ("ties", folders[0])):
            models = folders[1:] if base else folders
            flags = {"density": [0.5]} if method == "ties" else {}
            recipe = recipe_from_flags(method, models, base, {"weight": None, **flags}, {})
            on = timed(recipe, root / "out", args.repeats)
            real = ValueChecks.run
            ValueChecks.run = lambda self, name, inputs, fn, *_, **__: fn()
            try:
                off = timed(recipe, root / "out", args.repeats)
            finally:
                ValueChecks.run = real
            print(f"{method:<18}{on:>15.3f}{off:>15.3f}{on / off:>8.2f}")


if __name__ == "__main__":
    main()
