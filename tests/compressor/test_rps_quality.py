"""Quality direction of the compress stage on the zoo LM (slow; figures come from bench/rps_quality.py)."""
import importlib.util
from pathlib import Path

import pytest


@pytest.mark.slow
def test_stable_rps_holds_up_against_pruning_and_roast_at_budget_one_tenth():
    path = Path(__file__).resolve().parents[2] / "bench" / "rps_quality.py"
    spec = importlib.util.spec_from_file_location("rps_quality", path)
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    rows = bench.run(budgets=(0.1,), heal_steps=30, scratch_steps=60)
    got = {(r["setting"], r["method"]): r for r in rows if r["budget"] == 0.1}
    stable = got[("project+heal", "stable")]
    assert stable["perplexity"] < 0.7 * stable["perplexity_projected"]  # healing recovers most of the loss
    # at equal stored memory (pruning pays for its indices) STABLE-RPS is no worse than pruning, within 2 %
    assert stable["perplexity"] <= 1.02 * got[("project+heal", "magnitude pruning")]["perplexity"]
    assert got[("scratch", "stable")]["perplexity"] < got[("scratch", "roast")]["perplexity"]
