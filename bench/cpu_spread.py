"""How much the zoo's figures move with the CPU's kernels: the tiny zoo trained and evaluated under each
``ATEN_CPU_CAPABILITY`` (default = no SIMD, avx2, and this machine's native one), side by side.

    .venv/bin/python bench/cpu_spread.py [--caps default avx2 native] [--cache DIR] [--tokens 2000]

Each capability gets its own zoo cache (``DIR/CAP``; ``native`` uses the usual cache), built on first use
(about 6 minutes each on 2 cores). Prints the held-out perplexity of the base and the domain fine-tunes
per capability, and the spread (max/min - 1) per figure: a different x86-64 CPU lands within that spread.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

MODELS = ("base", "ft-prose", "ft-asyncio", "ft-email")
DOMAINS = ("prose", "asyncio", "email", "general")

CHILD = """
import json, sys, torch
from weightsmith.eval import evaluate_model
from weightsmith.zoo import build
zoo = build("tiny")
out = {"capability": torch.backends.cpu.get_cpu_capability(), "zoo": zoo.root.name}
for m in json.loads(sys.argv[1]):
    for d in json.loads(sys.argv[2]):
        r = evaluate_model(zoo.model(m), data=zoo.data(d, "valid"), max_tokens=int(sys.argv[3]), device="cpu")
        out[f"{m}/{d}"] = r.perplexity
print(json.dumps(out))
"""


def measure(cap: str, cache: Path, tokens: int) -> dict:
    env = dict(os.environ)
    if cap != "native":
        env.update(ATEN_CPU_CAPABILITY=cap, WEIGHTSMITH_CACHE=str(cache / cap))
    proc = subprocess.run([sys.executable, "-c", CHILD, json.dumps(MODELS), json.dumps(DOMAINS), str(tokens)],
                          env=env, capture_output=True, text=True, check=True)
    return json.loads(proc.stdout.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--caps", nargs="+", default=["default", "avx2", "native"])
    ap.add_argument("--cache", type=Path, default=Path.home() / ".cache" / "weightsmith-cpu-spread")
    ap.add_argument("--tokens", type=int, default=2000)
    args = ap.parse_args()
    runs = {cap: measure(cap, args.cache, args.tokens) for cap in args.caps}
    names = [f"{cap} ({r['capability']})" for cap, r in runs.items()]
    print(f"held-out perplexity, first {args.tokens} tokens; zoo trained and evaluated under each capability")
    print(f"| model / data | {' | '.join(names)} | spread |")
    print("|---|" + "---|" * (len(names) + 1))
    spreads = []
    for m in MODELS:
        for d in DOMAINS:
            vals = [r[f"{m}/{d}"] for r in runs.values()]
            spread = max(vals) / min(vals) - 1
            spreads.append(spread)
            print(f"| {m} / {d} | {' | '.join(f'{v:.2f}' for v in vals)} | {100 * spread:.1f}% |")
    spreads.sort()
    print(f"spread over {len(spreads)} figures: median {100 * spreads[len(spreads) // 2]:.1f}%, "
          f"max {100 * spreads[-1]:.1f}%")


if __name__ == "__main__":
    main()
