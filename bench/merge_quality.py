"""Domain merges on the tiny zoo: per-domain perplexity of the plain average and the task-vector merges,
for both multi-task sets (the AdamW fine-tunes ft-* and the SGD fine-tunes sgd-ft-*).

The settings are the ones ``tests/merge/test_quality.py`` asserts on, plus a small TIES grid; perplexity on
the first 2000 held-out tokens of each domain. Takes about 3 minutes on 2 CPU cores.

    .venv/bin/python bench/merge_quality.py [--json]
"""
from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path

from weightsmith.eval import evaluate_model
from weightsmith.merge import merge
from weightsmith.merge.recipe import recipe_from_flags
from weightsmith.zoo import build

DOMAINS = ("prose", "asyncio", "email")
TOKENS = 2000
THIRD = 1 / 3
# (label, method, per-model parameters, global parameters)
MERGES = [
    ("breadcrumbs (density 0.4, γ 0.01, λ 1.5)", "breadcrumbs", {"density": [0.4], "gamma": [0.01], "weight": [THIRD]},
     {"lambda": 1.5}),
    ("breadcrumbs (density 0.4, γ 0.01, λ 1.0)", "breadcrumbs", {"density": [0.4], "gamma": [0.01], "weight": [THIRD]},
     {"lambda": 1.0}),
    ("breadcrumbs_ties (density 0.4, γ 0.01, λ 1.0)", "breadcrumbs_ties",
     {"density": [0.4], "gamma": [0.01], "weight": [THIRD]}, {"lambda": 1.0}),
    *[(f"ties (density {d}, normalized, λ {lam}, trim {trim})", "ties", {"density": [d]},
       {"lambda": lam, "trim": trim}) for trim in ("model", "tensor") for d in (0.2, 0.5) for lam in (0.5, 1.0)],
    ("ties (density 0.5, weight 1/3, no normalize)", "ties", {"density": [0.5], "weight": [THIRD]},
     {"normalize": False}),
]


def perplexities(zoo, folder) -> list[float]:
    import weightsmith

    model = weightsmith.load(folder, device="cpu")
    return [evaluate_model(folder, data=zoo.data(d, "valid"), max_tokens=TOKENS, device="cpu", model=model).perplexity
            for d in DOMAINS]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()
    zoo = build("tiny")
    base = str(zoo.model("base"))
    tables = {}
    with tempfile.TemporaryDirectory(prefix="merge-quality-") as tmp:
        tmp = Path(tmp)
        for prefix, what in (("ft", "AdamW fine-tunes"), ("sgd-ft", "SGD fine-tunes")):
            fts = [str(zoo.model(f"{prefix}-{d}")) for d in DOMAINS]
            rows = {"base": perplexities(zoo, base)}
            rows["fine-tunes (own domain)"] = [perplexities(zoo, f)[i] for i, f in enumerate(fts)]
            merge(recipe_from_flags("linear", fts), tmp / f"{prefix}-avg", device="cpu")
            rows["plain average"] = perplexities(zoo, tmp / f"{prefix}-avg")
            for n, (label, method, per_model, params) in enumerate(MERGES):
                out = tmp / f"{prefix}-{n}"
                merge(recipe_from_flags(method, fts, base, per_model, params), out, device="cpu")
                rows[label] = perplexities(zoo, out)
            tables[what] = rows
    if args.json:
        print(json.dumps(tables, indent=2))
        return
    for what, rows in tables.items():
        average = sum(rows["plain average"]) / len(DOMAINS)
        print(f"\n## {what}: perplexity on {TOKENS} held-out tokens per domain (mean; * = below the plain average)\n")
        print(f"| model | {' | '.join(DOMAINS)} | mean |")
        print("|---|" + "---|" * (len(DOMAINS) + 1))
        for label, ppl in rows.items():
            mean = sum(ppl) / len(ppl)
            mark = "" if label.startswith(("base", "fine-tunes")) else ("*" if mean < average else "")
            shown = "–" if label.startswith("fine-tunes") else f"{mean:.2f}{mark}"
            print(f"| {label} | {' | '.join(f'{p:.2f}' for p in ppl)} | {shown} |")


if __name__ == "__main__":
    main()
