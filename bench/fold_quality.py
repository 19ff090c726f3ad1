"""Fold quality on the zoo base LM and on all-MiniLM-L6-v2.

LM: perplexity on held-out text after removing --remove of the blocks chosen by measured loss, FoldGPT
gates, ShortGPT BI or angular distance, before and after the same heal budget, with and without sharing.
MiniLM: calibration on the even-numbered Python language-reference topics (pydoc_data.topics), scored on
sentences of the odd-numbered topics (weightsmith.fold.english): mean / min cosine of the sentence
embeddings (the model's own sentence-transformers pooling) to the original's, Spearman correlation of all
pairwise sentence similarities (STS-style), and the seconds each importance took.

    .venv/bin/python bench/fold_quality.py [--heal-steps 200] [--size tiny] [--skip-minilm] [--skip-lm]
        [--lora-rank 8 | --lora-only] [--minilm-heal-steps 300] [--importances loss,bi,angular,gates]
"""
from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

import torch

import weightsmith
from weightsmith.eval import count_params, load_tokenizer, load_texts, perplexity, tokenize
from weightsmith.fold import fold
from weightsmith.zoo import build, minilm_path


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
        runs = [] if lora_only else [(imp, share, 0, 0) for imp in ("loss", "gates", "bi", "angular") for share in ("1", "2")]
        runs += [] if lora_only else [("loss", "2", rank, 0) for rank in (8, 16)]
        runs += [("loss", share, 0, lora_rank) for share in ("1", "2")] if lora_rank else []
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


def spearman(a: torch.Tensor, b: torch.Tensor) -> float:
    ra, rb = a.argsort().argsort().double(), b.argsort().argsort().double()
    ra, rb = ra - ra.mean(), rb - rb.mean()
    return float((ra * rb).sum() / (ra.norm() * rb.norm()))


@torch.no_grad()
def embed(model, tok, sentences, pooling, batch=64):
    out = []
    for s in range(0, len(sentences), batch):
        enc = tok(sentences[s:s + batch], padding=True, truncation=True, max_length=128, return_tensors="pt")
        out.append(pooling(model(**enc).last_hidden_state, enc["attention_mask"]))
    return torch.nn.functional.normalize(torch.cat(out), dim=-1)


def minilm_table(heal_steps: int, importances: list[str], sentences: int, seq: int, calib_sentences: int,
                 gate_steps: int, heal_lr: float, heal_batch: int, docstrings: bool, relax_rank: int,
                 blocks: tuple[int, ...] = (1, 2), share_init: str = "best", packages: bool = False,
                 relax_only: bool = False, pooled_weight: float = 1.0, splice: float = 0.0) -> None:
    from weightsmith.fold.english import english_sentences, write_calibration
    from weightsmith.pooling import read_pooling

    path = minilm_path()
    tok = load_tokenizer(path)
    pooling = read_pooling(path)
    original = weightsmith.load(path)
    held = english_sentences("heldout")[:sentences]
    ref = embed(original, tok, held, pooling)
    iu = torch.triu_indices(len(held), len(held), 1)
    ref_sim = (ref @ ref.T)[iu[0], iu[1]]
    with tempfile.TemporaryDirectory() as tmp:
        data = write_calibration(Path(tmp) / "calib.txt", calib_sentences, docstrings=docstrings, packages=packages)
        print(f"\nall-MiniLM-L6-v2 ({pooling.source}); calibration: {calib_sentences} sentences of the even "
              f"pydoc topics{' + the stdlib docstring sentences (heal only)' if docstrings else ''}"
              f"{' + those of its packages (heal only)' if packages else ''}, importance on "
              f"16,384 tokens in windows of {seq}; heal: batches of {heal_batch} sentences, lr {heal_lr:g}, pooled "
              f"weight {pooled_weight:g}, splice {splice:g}; "
              f"held out: {len(held)} sentences of the odd topics")
        print("| importance | removed | share | heal steps | importance s | heal s | mean cosine | min cosine | "
              "Spearman of pairwise sims |")
        print("|---|---|---|---|---|---|---|---|---|")
        runs = [(imp, 1 / 6, "1", 0) for imp in importances] if 1 in blocks else []
        runs += [(importances[0], 2 / 6, "2", 0)] if 2 in blocks and not (relax_only and relax_rank) else []
        runs += [(importances[0], 2 / 6, "2", relax_rank)] if relax_rank and 2 in blocks else []
        for importance, remove, share, rank in runs:
            for steps in (0, heal_steps):
                if steps and importance not in (importances[0], "bi") and share == "1":
                    continue
                out = Path(tmp) / f"m-{importance}-{share}-{rank}-{steps}"
                res = fold(path, out, data=data, remove=remove, share=share, importance=importance, heal_steps=steps,
                           device="cpu", model=original, seed=0, gate_steps=gate_steps, seq_len=seq, heal_lr=heal_lr,
                           batch_size=heal_batch, relax_rank=rank, heal_max_tokens=1_000_000,
                           share_init=share_init, heal_pooled_weight=pooled_weight, heal_splice=splice)
                got = embed(weightsmith.load(out), tok, held, pooling)
                cos = (got * ref).sum(-1)
                rho = spearman((got @ got.T)[iu[0], iu[1]], ref_sim)
                sec = res["seconds"]
                label = share + (f" + relax r={rank}" if rank else "") + (f", init {share_init}" if share == "2" else "")
                print(f"| {importance} | {res['removed']} | {label} | {steps} | {sec['importance']:.1f} | "
                      f"{sec.get('heal', 0):.0f} | {cos.mean():.4f} | {cos.min():.4f} | {rho:.4f} |", flush=True)


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
    ap.add_argument("--minilm-heal-steps", type=int, default=300)
    ap.add_argument("--importances", default="loss,bi,angular,gates", help="MiniLM rows; the first one also folds 2 blocks")
    ap.add_argument("--sentences", type=int, default=300, help="held-out MiniLM sentences")
    ap.add_argument("--calib-sentences", type=int, default=805, help="MiniLM calibration sentences")
    ap.add_argument("--seq", type=int, default=128, help="MiniLM calibration window of the importance")
    ap.add_argument("--minilm-heal-lr", type=float, default=4e-4)
    ap.add_argument("--minilm-heal-batch", type=int, default=128, help="sentences per MiniLM heal step")
    ap.add_argument("--no-docstrings", action="store_true", help="heal MiniLM on the pydoc calibration sentences only")
    ap.add_argument("--packages", action="store_true",
                    help="heal MiniLM on the docstring sentences of the stdlib's packages too (about twice the text)")
    ap.add_argument("--minilm-blocks", default="1,2", help="MiniLM rows: one block removed (1), two with --share 2 (2)")
    ap.add_argument("--minilm-relax-rank", type=int, default=0, help="also fold two blocks with --share 2 + this relax rank")
    ap.add_argument("--minilm-relax-only", action="store_true",
                    help="with --minilm-relax-rank, fold the two blocks only with the relaxation")
    ap.add_argument("--minilm-share-init", default="best", help="share init of the two-block MiniLM rows")
    ap.add_argument("--gate-steps", type=int, default=100)
    ap.add_argument("--minilm-heal-pooled-weight", type=float, default=1.0, help="fold's --heal-pooled-weight")
    ap.add_argument("--minilm-heal-splice", type=float, default=0.0, help="fold's --heal-splice")
    ap.add_argument("--threads", type=int, default=1, help="torch threads (1 keeps runs comparable side by side)")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    if not args.skip_lm:
        lm_table(args.size, args.heal_steps, args.remove, args.lora_rank, args.lora_lr, args.lora_only)
    if not args.skip_minilm:
        minilm_table(args.minilm_heal_steps, args.importances.split(","), args.sentences, args.seq,
                     args.calib_sentences, args.gate_steps, args.minilm_heal_lr, args.minilm_heal_batch,
                     not args.no_docstrings, args.minilm_relax_rank,
                     tuple(int(b) for b in args.minilm_blocks.split(",")), args.minilm_share_init, args.packages,
                     args.minilm_relax_only, args.minilm_heal_pooled_weight, args.minilm_heal_splice)


if __name__ == "__main__":
    main()
