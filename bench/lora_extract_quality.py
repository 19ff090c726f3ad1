"""Rank -> held-out perplexity of base + extracted LoRA adapter, beside the fine-tune and the base (the zoo's
`base` and its prose fine-tune `ft-prose`, perplexity on prose.valid), and the adapter's size.

Each row runs `extract_lora` (the library call behind `weightsmith extract-lora`) at a fixed --max-rank, or
with --rank auto at an energy share. Embeddings and norms are kept at full rank as mergekit does by default
(modules_to_save); `--embed-lora` decomposes the embeddings too, which is what shrinks a small-vocabulary
model's adapter. The same adapters load in peft: the perplexity is measured on
PeftModel.from_pretrained(base, adapter).merge_and_unload().

    python bench/lora_extract_quality.py
    python bench/lora_extract_quality.py --embed-lora
"""
from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from weightsmith.compressor.lora_extract import extract_lora  # noqa: E402
from weightsmith.zoo import build  # noqa: E402
from weightsmith.zoo.build import cache_root  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--finetune", default="ft-prose")
    ap.add_argument("--domain", default="prose")
    ap.add_argument("--ranks", default="1,2,4,8,16,32,64")
    ap.add_argument("--energies", default="0.5,0.8,0.95")
    ap.add_argument("--embed-lora", action="store_true")
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()
    torch.set_num_threads(2)
    zoo = build("tiny")
    base, ft, data = zoo.model("base"), zoo.model(args.finetune), zoo.data(args.domain, "valid")
    runs = [({"max_rank": int(r)}, f"r={r}") for r in args.ranks.split(",")]
    runs += [({"max_rank": 64, "rank": "auto", "energy": float(e)}, f"auto {e}") for e in args.energies.split(",")]
    rows, ends = [], {}
    with tempfile.TemporaryDirectory(prefix="lora-bench-", dir=cache_root()) as tmp:
        for i, (values, label) in enumerate(runs):
            info = extract_lora(ft, Path(tmp) / f"a{i}", base=base, data=data, tokenizer=zoo.tokenizer,
                                embed_lora=args.embed_lora, device="cpu", **values)
            by_role = {r["role"]: r for r in info["eval"]}
            ends = {"base": by_role["base"], "fine-tune": by_role["fine-tune"]}
            ranks = sorted(info["ranks"].values())
            rows.append({"run": label, "r": info["r"], "median_rank": ranks[len(ranks) // 2],
                         "perplexity": by_role["base + adapter"]["perplexity"],
                         "adapter_params": info["adapter_params"], "adapter_bytes": info["adapter_bytes"],
                         "seconds": info["seconds"]})
    ft_bytes = sum(p.stat().st_size for p in Path(ft).glob("*.safetensors"))
    if args.json:
        print(json.dumps({"rows": rows, "base": ends["base"], "finetune": ends["fine-tune"]}, indent=2))
        return
    print(f"zoo base -> {args.finetune}, perplexity on {data.name} ({ends['base']['tokens']} tokens); "
          f"embeddings {'decomposed' if args.embed_lora else 'at full rank'}")
    print(f"{'model':<22} {'r (median)':>10} {'perplexity':>11} {'adapter params':>15} {'adapter KB':>11} "
          f"{'of ft size':>10} {'extract s':>9}")
    print(f"{'base':<22} {'':>10} {ends['base']['perplexity']:>11.3f}")
    for r in rows:
        print(f"{'base + ' + r['run']:<22} {r['r']:>5} ({r['median_rank']:>2}) {r['perplexity']:>11.3f} "
              f"{r['adapter_params']:>15,} {r['adapter_bytes'] / 1024:>11.0f} {r['adapter_bytes'] / ft_bytes:>10.1%} "
              f"{r['seconds']:>9.2f}")
    print(f"{args.finetune:<22} {'':>10} {ends['fine-tune']['perplexity']:>11.3f} {'':>15} {ft_bytes / 1024:>11.0f}")


if __name__ == "__main__":
    main()
