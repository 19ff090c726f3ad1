"""mergekit's parameter settings, evaluated for one tensor: a scalar, a list read as a layer gradient, or a
list of ``{filter, value}`` entries where the first whose filter is a substring of the tensor name (or
``*``/absent) wins. The planner looks a parameter up through scopes (an input's own, its slice's, the recipe's).
"""
from __future__ import annotations

from ..errors import WeightsmithError


def evaluate_setting(setting, tensor_name: str, t: float, where: str):
    """Resolve one parameter setting for a tensor at relative depth ``t`` (mergekit semantics)."""
    if isinstance(setting, dict):
        setting = [setting]
    if setting is None or isinstance(setting, (bool, int, float, str)):
        return setting
    if not isinstance(setting, list) or not setting:
        raise WeightsmithError(f"{where}: cannot read parameter value {setting!r}")
    if all(isinstance(e, (bool, int, float, str)) for e in setting):
        if not all(isinstance(e, (int, float)) and not isinstance(e, bool) for e in setting):
            return setting[int(t * (len(setting) - 1))]
        scaled = t * (len(setting) - 1)
        i0 = int(scaled)
        i1 = min(len(setting) - 1, i0 + 1)
        frac = scaled - i0
        return (1 - frac) * setting[i0] + frac * setting[i1]
    for cond in setting:
        if not isinstance(cond, dict) or "value" not in cond:
            raise WeightsmithError(f"{where}: a filtered value needs 'value' (and optionally 'filter'), got {cond!r}")
        flt = cond.get("filter")
        if flt is None or flt == "*" or flt in tensor_name:
            return evaluate_setting(cond["value"], tensor_name, t, where)
    return None


def first_setting(scopes: list[dict], key: str, tensor: str, t: float, where: str):
    """The value of ``key`` from the first scope whose setting gives one for this tensor (a filter list
    that matches nothing falls through to the next scope, as in mergekit); None if none does."""
    for scope in scopes:
        if key in scope:
            value = evaluate_setting(scope[key], tensor, t, where)
            if value is not None:
                return value
    return None
