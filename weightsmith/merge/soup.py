"""Greedy soup (Wortsman et al. 2022, arXiv 2203.05482): a uniform soup grown by held-out score.

Ingredients are ranked by their own held-out score, best first; each next ingredient joins the
soup only if the uniform average of soup ∪ {ingredient} scores strictly better. Each candidate soup
is written by the streaming engine and scored by weightsmith.eval, so memory stays per tensor.
"""
from __future__ import annotations

import tempfile
from pathlib import Path

from ..checkpoint import check_output
from ..errors import OptionError, WeightsmithError
from ..progress import ProgressFn, report
from .stage import merge
from .recipe import ModelEntry, Recipe

def _score(path: Path, data, labelled, max_tokens, device) -> float:
    from ..eval import evaluate_model

    row = evaluate_model(path, data=data, labelled=labelled, max_tokens=max_tokens, device=device)
    return row.accuracy if labelled else row.perplexity


def greedy_soup_recipe(recipe: Recipe, out: str | Path, *, device: str = "auto", dtype: str | None = None,
                       out_shard_size: str | int = "5GB", seed: int = 0, allow_crimes: bool = False,
                       force: bool = False, progress: ProgressFn | None = None, copy_tokenizer: bool = True,
                       model_card: bool = True, allow_nonfinite: bool = False) -> dict:
    """Greedy soup of ``recipe.models`` scored on ``parameters.data`` (or ``labelled``); returns the trace.
    Each soup is an engine merge (value checks included, ``allow_nonfinite`` passed on); ``copy_tokenizer``
    and ``model_card`` apply to the last. Parameters are declared and checked in ``methods``' registration."""
    data, labelled = recipe.parameters.get("data"), recipe.parameters.get("labelled")
    max_tokens = recipe.parameters.get("max_tokens")
    if (data is None) == (labelled is None):
        raise OptionError(None, "greedy_soup needs exactly one held-out set: {0} (text, perplexity) or {1} (labelled "
                                "file, accuracy)", ("data", "labelled"))
    held_out = Path(data or labelled)
    if not held_out.is_file():
        raise WeightsmithError(f"{held_out}: held-out data file not found")
    if max_tokens is not None and (not isinstance(max_tokens, int) or max_tokens <= 0):
        raise WeightsmithError(f"greedy_soup max_tokens must be a positive integer, got {max_tokens!r}")
    paths = [m.path for m in recipe.models]
    for p in paths:
        if not (Path(p) / "config.json").is_file():
            raise WeightsmithError(f"model {p}: not a model folder (no config.json)")
    check_output(out, paths, force)
    better = (lambda a, b: a > b) if labelled else (lambda a, b: a < b)

    total = 2 * len(paths) - 1
    report(progress, "greedy soup", 0, total)
    scores = {}
    for i, p in enumerate(paths):
        scores[p] = _score(Path(p), data, labelled, max_tokens, device)
        report(progress, "greedy soup", i + 1, total)
    ranked = sorted(paths, key=lambda p: scores[p], reverse=bool(labelled))
    soup, best = [ranked[0]], scores[ranked[0]]
    trace = [{"ingredient": ranked[0], "score": best, "soup_score": best, "kept": True}]

    def soup_recipe(members: list[str]) -> Recipe:
        compat = {"compat": recipe.parameters["compat"]} if recipe.parameters.get("compat") else {}
        return Recipe("linear", [ModelEntry(m, {"weight": 1.0}) for m in members], None, {"normalize": True, **compat},
                      recipe.dtype, out_dtype=recipe.out_dtype)

    with tempfile.TemporaryDirectory(prefix="weightsmith-soup-") as tmp:
        for i, p in enumerate(ranked[1:]):
            cand = Path(tmp) / f"candidate-{i}"
            merge(soup_recipe(soup + [p]), cand, device=device, dtype=dtype, allow_crimes=allow_crimes,
                  allow_nonfinite=allow_nonfinite)
            score = _score(cand, data, labelled, max_tokens, device)
            kept = better(score, best)
            if kept:
                soup, best = soup + [p], score
            trace.append({"ingredient": p, "score": scores[p], "soup_score": score, "kept": kept})
            report(progress, "greedy soup", len(paths) + i + 1, total)
    final = soup_recipe(soup)
    final.text = recipe.text or recipe.to_yaml()
    metric = "accuracy" if labelled else "perplexity"
    rows = [{"model": Path(t["ingredient"]).name, f"own {metric}": t["score"], f"soup {metric}": t["soup_score"],
             "kept": "yes" if t["kept"] else "no"} for t in trace]
    result = merge(final, out, device=device, dtype=dtype, out_shard_size=out_shard_size, seed=seed,
                   allow_crimes=allow_crimes, force=force, progress=progress, metrics=rows,
                   copy_tokenizer=copy_tokenizer, model_card=model_card, allow_nonfinite=allow_nonfinite)
    result.update(method="greedy_soup", inputs=paths, soup=soup, trace=trace, metric=metric, score=best)
    return result
