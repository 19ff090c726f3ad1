"""Quality direction on the tiny zoo: the merges improve on the baselines they are meant to beat.

Perplexities use the first 2000 tokens of each validation split. Settings were picked once on the
zoo and are reported in the merge stage's README section.
"""
from __future__ import annotations

import pytest

from weightsmith.eval import evaluate_model
from weightsmith.merge import merge
from weightsmith.merge.recipe import recipe_from_flags

DOMAINS = ("prose", "asyncio", "email")
TOKENS = 2000


def mean_ppl(zoo, folder) -> float:
    import weightsmith

    model = weightsmith.load(folder, device="cpu")
    return sum(evaluate_model(folder, data=zoo.data(d, "valid"), max_tokens=TOKENS, device="cpu", model=model).perplexity
               for d in DOMAINS) / len(DOMAINS)


@pytest.fixture(scope="module")
def plain_average(zoo, tmp_path_factory):
    out = tmp_path_factory.mktemp("avg") / "average"
    merge(recipe_from_flags("linear", [str(zoo.model(f"ft-{d}")) for d in DOMAINS]), out, device="cpu")
    return mean_ppl(zoo, out)


def _task_vector_merge(zoo, tmp_path, method, per_model, params):
    fts = [str(zoo.model(f"ft-{d}")) for d in DOMAINS]
    merge(recipe_from_flags(method, fts, str(zoo.model("base")), per_model, params), tmp_path / method, device="cpu")
    return mean_ppl(zoo, tmp_path / method)


@pytest.mark.slow
def test_breadcrumbs_beats_plain_average_across_domains(zoo, plain_average, tmp_path):
    ppl = _task_vector_merge(zoo, tmp_path, "breadcrumbs", {"density": [0.4], "gamma": [0.01], "weight": [1 / 3]},
                             {"lambda": 1.5})
    assert ppl < plain_average


@pytest.mark.slow
def test_breadcrumbs_ties_beats_plain_average_across_domains(zoo, plain_average, tmp_path):
    ppl = _task_vector_merge(zoo, tmp_path, "breadcrumbs_ties", {"density": [0.4], "gamma": [0.01], "weight": [1 / 3]},
                             {"lambda": 1.0})
    assert ppl < plain_average


@pytest.mark.slow
@pytest.mark.xfail(strict=True, reason="on the tiny zoo every TIES setting tried (density 0.2-1.0, lambda 0.4-1.5, "
                   "normalized or not, trimmed per tensor or over the whole model) stayed above the plain average "
                   "(64.0 here, best 63.7, vs 62.9 mean perplexity), as it "
                   "did with longer fine-tunes and on the bench-size base: task arithmetic above weight 1/3 already "
                   "hurts, so these small models' task vectors do not add linearly")
def test_ties_beats_plain_average_across_domains(zoo, plain_average, tmp_path):
    ppl = _task_vector_merge(zoo, tmp_path, "ties", {"density": [0.5], "weight": [1 / 3]},
                             {"lambda": 1.0, "normalize": False})
    assert ppl < plain_average


@pytest.mark.slow
def test_greedy_soup_no_worse_than_best_ingredient(zoo, tmp_path):
    data = zoo.data("asyncio", "valid")
    res = merge(recipe_from_flags("greedy_soup", [str(s) for s in zoo.soups],
                                  parameters={"data": str(data), "max_tokens": TOKENS}), tmp_path / "soup", device="cpu")
    best = min(t["score"] for t in res["trace"])
    soup = evaluate_model(tmp_path / "soup", data=data, max_tokens=TOKENS, device="cpu").perplexity
    assert soup <= best + 1e-6
    assert len(res["trace"]) == len(zoo.soups) and res["trace"][0]["kept"]
    assert "soup perplexity" in (tmp_path / "soup" / "README.md").read_text()


def test_mwa_loss_weighted_beats_uniform_checkpoint_average(zoo, tmp_path):
    cks = [str(c) for c in zoo.mwa_checkpoints]
    scores = {}
    for p in (0.0, 4.0):
        merge(recipe_from_flags("mwa", cks, parameters={"p": p, "metric": "loss"}), tmp_path / f"p{p}", device="cpu")
        scores[p] = evaluate_model(tmp_path / f"p{p}", data=zoo.data("email", "valid"), max_tokens=TOKENS,
                                   device="cpu").perplexity
    assert scores[4.0] < scores[0.0]
