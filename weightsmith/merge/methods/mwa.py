"""Metrics-Weighted Averaging of checkpoints from one training run (Yu & Choi 2025, arXiv 2504.18580).

wᵢ = mᵢ^p / Σⱼ mⱼ^p with mᵢ = 1/lossᵢ (loss-weighted) or mᵢ = stepᵢ (step-weighted); p = 0 is the
uniform average and a large p tends to the single best (or last) checkpoint. Works on full
checkpoints and on PEFT/LoRA adapter folders alike: the weights feed a plain linear merge.
"""
from __future__ import annotations

import math
from pathlib import Path

from ...checkpoint import read_json
from ...errors import WeightsmithError
from ..recipe import ModelEntry, Recipe
from ..registry import Param, get_method, merge_method


def checkpoint_metric(folder: str | Path, metric: str) -> float:
    """Training loss (as 1/loss) or step of a checkpoint, from its trainer_state.json."""
    path = Path(folder) / "trainer_state.json"
    if not path.is_file():
        raise WeightsmithError(f"{folder}: no trainer_state.json; give the {metric} per model (metric_value) instead")
    state = read_json(path, "trainer_state.json")
    step = state.get("global_step")
    logged = [e for e in state.get("log_history") or [] if isinstance(e, dict) and "loss" in e
              and (step is None or e.get("step", 0) <= step)]
    if metric == "step":
        step = step if step is not None else (logged[-1].get("step") if logged else None)
        if not isinstance(step, (int, float)) or step <= 0:
            raise WeightsmithError(f"{path}: no positive global_step to weight by")
        return float(step)
    if not logged:
        raise WeightsmithError(f"{path}: log_history has no 'loss' entry to weight by")
    loss = float(logged[-1]["loss"])
    if not loss > 0:
        raise WeightsmithError(f"{path}: training loss {loss} must be positive for loss weighting")
    return 1.0 / loss


def mwa_weights(metrics: list[float], p: float) -> list[float]:
    """wᵢ = mᵢ^p / Σⱼ mⱼ^p, computed in log space so a large p does not overflow."""
    if any(not m > 0 for m in metrics):
        raise WeightsmithError(f"MWA metrics must be positive, got {metrics}")
    logs = [p * math.log(m) for m in metrics]
    top = max(logs)
    raw = [math.exp(v - top) for v in logs]
    total = sum(raw)
    return [r / total for r in raw]


@merge_method("mwa", title="Metrics-Weighted Averaging", url="https://arxiv.org/abs/2504.18580", kind="rewrite",
              params=(Param("metric", str, "loss", choices=("loss", "step"),
                            help="1/loss or step as each checkpoint's metric"),
                      Param("p", float, 1.0, "global", 0.0, help="penalty factor: w_i = m_i^p / sum m_j^p"),
                      Param("metric_value", float, None, "model", 0.0,
                            help="the metric, when not read from trainer_state.json")),
              notes="weights computed from the checkpoints' metrics, then a linear merge")
def mwa(recipe, params: dict, where: str):
    """MWA's weights from the checkpoints' metrics; the merge is then a normalized linear one."""
    method = get_method("mwa")
    metric, p = params["metric"], params["p"]
    values = []
    for m in recipe.models:
        given = m.parameters.get("metric_value")
        if given is not None:
            v = method.param("metric_value").check(given, f"{where}: model {m.path}")
            values.append(1.0 / v if metric == "loss" else v)
        else:
            if not Path(m.path).is_dir():
                raise WeightsmithError(f"model {m.path}: folder not found")
            values.append(checkpoint_metric(m.path, metric))
    weights = mwa_weights(values, p)
    linear_recipe = Recipe("linear", [ModelEntry(m.path, {"weight": w}) for m, w in zip(recipe.models, weights)],
                           recipe.base_model, {"normalize": True, **({"compat": recipe.parameters["compat"]}
                                                                      if "compat" in recipe.parameters else {})},
                           recipe.dtype, recipe.text, out_dtype=recipe.out_dtype)
    card = {"metric": metric, "p": p, "weights": {m.path: round(w, 6) for m, w in zip(recipe.models, weights)}}
    return linear_recipe, card
