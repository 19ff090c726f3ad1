"""Merge stage: N checkpoints -> 1, by soups, MWA, task arithmetic, TIES, DARE, breadcrumbs, SLERP, model stock.

``merge(recipe, out)`` streams one tensor name at a time; ``REGISTRY`` maps mergekit method names to
pure tensor functions (``weightsmith.merge.methods``) or to whole-model functions (greedy soup, PLeaS).
"""
from .engine import merge, plan_merge
from .methods import REGISTRY, Method, Param, get_method
from .recipe import ModelEntry, Recipe, load_recipe, parse_recipe

__all__ = ["REGISTRY", "Method", "ModelEntry", "Param", "Recipe", "get_method", "load_recipe", "merge", "parse_recipe",
           "plan_merge"]
