"""How much the zoo's figures move with the CPU's kernels: the tiny zoo's ``base`` and ``ft-prose`` retrained
exactly as the zoo build trains them under other kernels, then evaluated on every held-out set. Each setting
is environment variables: ``ATEN_CPU_CAPABILITY`` (torch's own vector kernels: default = no SIMD, avx2) and
``MKL_CBWR=COMPATIBLE`` (MKL's matrix products in its portable code path, as another CPU family gets other
MKL kernels), alone and together.

    .venv/bin/python bench/cpu_spread.py [--settings native ATEN_CPU_CAPABILITY=default ...] [--tokens 2000]

The tokenizer and text come from the cached zoo (they do not depend on the CPU). Prints perplexities per
capability, the spread (max/min - 1) per figure, and whether the retrained native model is bitwise the
cached one (the build is deterministic on one machine). Evaluating one fixed model under the different
kernels moves perplexity by about 1e-7 relative; training is what amplifies the kernels' rounding.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys

DOMAINS = ("prose", "asyncio", "email", "general")

CHILD = """
import json, sys, torch
from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM
from weightsmith.checkpoint import Checkpoint
from weightsmith.eval import evaluate_model
from weightsmith.zoo import build, corpus
from weightsmith.zoo.build import FT_DOMAINS, SIZES, _tokenize, mix_base_stream
from weightsmith.zoo.train import train_lm
torch.set_num_threads(1)
zoo, r = build("tiny"), SIZES["tiny"]
tok = AutoTokenizer.from_pretrained(str(zoo.tokenizer))
streams = {d: _tokenize(tok, corpus.split_text(d, "train", r["train_chars"])) for d in (*FT_DOMAINS, corpus.GENERAL)}
config = LlamaConfig.from_pretrained(str(zoo.model("base")))
torch.manual_seed(0)
base = LlamaForCausalLM(config)
train_lm(base, mix_base_stream(streams), steps=r["base_steps"], lr=r["lr"], batch_size=r["batch"], seq_len=r["seq"], seed=0)
ft = LlamaForCausalLM(config)
ft.load_state_dict(base.state_dict())
train_lm(ft, streams["prose"], steps=r["ft_steps"], lr=r["ft_lr"], batch_size=r["batch"], seq_len=r["seq"], seed=100)
cached = Checkpoint(zoo.model("base"))
out = {"capability": torch.backends.cpu.get_cpu_capability(),
       "same_as_cache": all(torch.equal(v, cached.get(k)) for k, v in base.state_dict().items() if k in cached)}
for name, model in (("base", base), ("ft-prose", ft)):
    for d in json.loads(sys.argv[1]):
        out[f"{name}/{d}"] = evaluate_model(zoo.model("base"), data=zoo.data(d, "valid"), max_tokens=int(sys.argv[2]),
                                            device="cpu", model=model).perplexity
print(json.dumps(out))
"""


SETTINGS = ["native", "ATEN_CPU_CAPABILITY=default", "ATEN_CPU_CAPABILITY=avx2", "MKL_CBWR=COMPATIBLE",
            "ATEN_CPU_CAPABILITY=default,MKL_CBWR=COMPATIBLE"]


def start(setting: str, tokens: int) -> subprocess.Popen:
    env = dict(os.environ)
    if setting != "native":
        env.update(kv.split("=", 1) for kv in setting.split(","))
    return subprocess.Popen([sys.executable, "-c", CHILD, json.dumps(DOMAINS), str(tokens)], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def finish(proc: subprocess.Popen) -> dict:
    out, err = proc.communicate()
    if proc.returncode:
        sys.exit(err)
    return json.loads(out.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--settings", nargs="+", default=SETTINGS)
    ap.add_argument("--tokens", type=int, default=2000)
    args = ap.parse_args()
    procs = {s: start(s, args.tokens) for s in args.settings}  # side by side: each trains on one thread
    runs = {s: finish(p) for s, p in procs.items()}
    names = [f"S{i}" for i in range(len(runs))]
    print(f"held-out perplexity (first {args.tokens} tokens) of base and ft-prose retrained under each setting")
    for i, s in enumerate(runs):
        print(f"S{i}: {s} (torch kernels: {runs[s]['capability']})")
    print(f"| model / data | {' | '.join(names)} | spread |")
    print("|---|" + "---|" * (len(runs) + 1))
    spreads = []
    for key in (k for k in next(iter(runs.values())) if "/" in k):
        vals = [r[key] for r in runs.values()]
        spreads.append(max(vals) / min(vals) - 1)
        print(f"| {key} | {' | '.join(f'{v:.2f}' for v in vals)} | {100 * spreads[-1]:.1f}% |")
    spreads.sort()
    print(f"spread over {len(spreads)} figures: median {100 * spreads[len(spreads) // 2]:.1f}%, "
          f"max {100 * spreads[-1]:.1f}%")
    for s, r in runs.items():
        print(f"{s}: retrained base bitwise equal to the cached zoo's: {r['same_as_cache']}")


if __name__ == "__main__":
    main()
