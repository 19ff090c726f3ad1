"""Quality direction on digits (slow): PLeaS beats every weight average and nears the 2× ensemble."""
from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "bench"))


@pytest.mark.slow
def test_pleas_beats_averages_and_nears_the_ensemble_on_split_digits():
    from pleas_quality import classifier_run

    runs = [classifier_run("mlp", seed, epochs=30, widths=(1.0, 1.2))["accuracy"] for seed in range(3)]
    mean = {k: np.mean([r[k] for r in runs]) for k in runs[0]}
    best_average = max(mean["plain average"], mean["weight matching + avg"], mean["activation matching + avg"])
    assert mean["A own half"] > 0.95 and mean["B own half"] > 0.95
    assert mean["PLeaS 1.0x"] >= best_average + 0.05
    assert mean["PLeaS 1.2x"] >= 0.95 * mean["ensemble 2x"]
