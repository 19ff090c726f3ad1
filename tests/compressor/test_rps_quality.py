"""Quality direction of the compress stage on the zoo LM (slow; figures come from bench/rps_quality.py)."""
import importlib.util
from pathlib import Path

import pytest


@pytest.mark.slow
def test_stable_rps_beats_roast_after_projection_and_healing_at_budget_one_tenth():
    path = Path(__file__).resolve().parents[2] / "bench" / "rps_quality.py"
    spec = importlib.util.spec_from_file_location("rps_quality", path)
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    rows = bench.run(budgets=(0.1,), heal_steps=30, scratch_steps=60)
    got = {(r["setting"], r["method"]): r["perplexity"] for r in rows if r["budget"] == 0.1}
    assert got[("project+heal", "stable")] < got[("project+heal", "roast")]
    assert got[("scratch", "stable")] < got[("scratch", "roast")]
