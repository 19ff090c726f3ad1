"""Fold quality on the zoo base LM and on all-MiniLM-L6-v2.

LM: perplexity on held-out text after removing --remove of the blocks chosen by FoldGPT gates, ShortGPT
BI or angular distance, before and after the same heal budget, with and without sharing; unique params.
MiniLM: analyze, then folds scored by the cosine of mean-pooled embeddings to the original's.

    .venv/bin/python bench/fold_quality.py [--heal-steps 200] [--size tiny] [--skip-minilm] [--lora-only]
"""
from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

import torch

import weightsmith
from weightsmith.eval import count_params, load_tokenizer, load_texts, perplexity, tokenize
from weightsmith.fold import analyze, fold
from weightsmith.zoo import build, minilm_path

SENTENCES = [
    "The cat slept on the warm windowsill all afternoon.",
    "A kitten dozed in the sun by the window.",
    "Interest rates rose again as the central bank fought inflation.",
    "The bank raised its lending rates to slow rising prices.",
    "She trained for months before running her first marathon.",
    "Running a marathon takes long preparation and discipline.",
    "The recipe calls for two cups of flour and a pinch of salt.",
    "Add flour and salt to the bowl and mix well.",
    "Python lists can grow and shrink while a program runs.",
    "A dynamic array resizes itself when elements are appended.",
    "The museum opens at nine and closes at five on weekdays.",
    "Heavy rain flooded the streets of the old town overnight.",
    "The orchestra tuned their instruments before the concert.",
    "He forgot his umbrella and got soaked on the way home.",
    "Solar panels convert sunlight directly into electricity.",
    "The train to the airport leaves every fifteen minutes.",
]


def lm_ppl(model, ids, context=128):
    return perplexity(model, ids, context=context, stride=context)["perplexity"]


def lm_table(size: str, heal_steps: int, remove: float, lora_rank: int = 8, lora_lr: float = 1e-3,
             lora_only: bool = False) -> None:
    zoo = build(size)
    base = zoo.model("base")
    calib, valid = zoo.data("general", "calib"), zoo.data("general", "valid")
    tok = load_tokenizer(base)
    ids = tokenize(tok, load_texts(valid), 8192)
    original = weightsmith.load(base)
    ref = lm_ppl(original, ids)
    rows = [("original", "-", "-", "-", ref, count_params(original))]
    with tempfile.TemporaryDirectory() as tmp:
        runs = [] if lora_only else [(imp, share, 0, 0) for imp in ("gates", "bi", "angular") for share in ("1", "2")]
        runs += [] if lora_only else [("gates", "2", rank, 0) for rank in (8, 16)]
        runs += [("gates", share, 0, lora_rank) for share in ("1", "2")] if lora_rank else []
        for importance, share, rank, lora in runs:
            for steps in ((heal_steps,) if lora else (0, heal_steps)):
                out = Path(tmp) / f"{importance}-{share}-{rank}-{lora}-{steps}"
                res = fold(base, out, data=calib, remove=remove, share=share, importance=importance,
                           relax_rank=rank, heal_steps=steps, heal_lora=lora, heal_lr=lora_lr if lora else 3e-4,
                           device="cpu", model=original, seed=0)
                m = weightsmith.load(out)
                label = share + (f" + relax r={rank}" if rank else "")
                heal = str(steps) + (f" LoRA r={lora}, lr {lora_lr:g}" if lora else "")
                rows.append((importance, str(res["removed"]), label, heal, lm_ppl(m, ids), count_params(m)))
                print(f"  done {importance} share={label} heal={heal}", flush=True)
    print(f"\nzoo {size} base, remove {remove:.0%}, perplexity on general.valid ({ids.numel()} tokens), heal on general.calib")
    print("| importance | removed | share | heal steps | perplexity | x original | unique params |")
    print("|---|---|---|---|---|---|---|")
    for imp, rem, share, steps, ppl, params in rows:
        print(f"| {imp} | {rem} | {share} | {steps} | {ppl:.2f} | {ppl / ref:.3f} | {params:,} |")


@torch.no_grad()
def embed(model, tok, sentences):
    enc = tok(sentences, padding=True, truncation=True, max_length=128, return_tensors="pt")
    h = model(**enc).last_hidden_state
    mask = enc["attention_mask"].unsqueeze(-1).float()
    return torch.nn.functional.normalize((h * mask).sum(1) / mask.sum(1), dim=-1)


def minilm_table(heal_steps: int, data: Path) -> None:
    path = minilm_path()
    tok = load_tokenizer(path)
    original = weightsmith.load(path)
    ref = embed(original, tok, SENTENCES)
    with tempfile.TemporaryDirectory() as tmp:
        rep = analyze(path, data, Path(tmp) / "analysis", device="cpu", remove=1 / 3)
        print(f"\nall-MiniLM-L6-v2 analyze: BI {rep['block_influence']}; ShortGPT drops {rep['shortgpt_drop']}, "
              f"angular drops {rep['angular_drop']}")
        print("| importance | removed | share | heal steps | mean cosine to original | min cosine | unique params |")
        print("|---|---|---|---|---|---|---|")
        print(f"| original | - | - | - | 1.0000 | 1.0000 | {count_params(original):,} |")
        for importance, share in (("gates", "1"), ("bi", "1"), ("gates", "2")):
            for steps in (0, heal_steps):
                out = Path(tmp) / f"m-{importance}-{share}-{steps}"
                res = fold(path, out, data=data, remove=1 / 3, share=share, importance=importance, heal_steps=steps,
                           device="cpu", model=original, seed=0, gate_steps=100, max_tokens=8192)
                m = weightsmith.load(out)
                cos = (embed(m, tok, SENTENCES) * ref).sum(-1)
                print(f"| {importance} | {res['removed']} | {share} | {steps} | {cos.mean():.4f} | {cos.min():.4f} | "
                      f"{count_params(m):,} |", flush=True)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--size", default="tiny")
    ap.add_argument("--heal-steps", type=int, default=200)
    ap.add_argument("--remove", type=float, default=0.25)
    ap.add_argument("--skip-minilm", action="store_true")
    ap.add_argument("--skip-lm", action="store_true")
    ap.add_argument("--lora-rank", type=int, default=8, help="also heal with LoRA adapters of this rank (0: skip)")
    ap.add_argument("--lora-lr", type=float, default=1e-3, help="learning rate of the LoRA heals")
    ap.add_argument("--lora-only", action="store_true", help="only the LoRA-healed rows (and the original)")
    args = ap.parse_args()
    torch.set_num_threads(1)
    if not args.skip_lm:
        lm_table(args.size, args.heal_steps, args.remove, args.lora_rank, args.lora_lr, args.lora_only)
    if not args.skip_minilm:
        minilm_table(min(args.heal_steps, 50), build(args.size).data("prose", "calib"))


if __name__ == "__main__":
    main()
