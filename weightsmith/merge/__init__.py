"""Merge stage: N checkpoints -> 1, by soups, MWA, task arithmetic, TIES, DARE, breadcrumbs, SLERP, model stock.

``merge(recipe, out)`` streams one tensor name at a time; the registry (``weightsmith.merge.registry``)
holds one declaration per method: a pure tensor function (``weightsmith.merge.methods``) or a
whole-model function (greedy soup, PLeaS), its parameters and hooks.
"""
from .plan import plan_merge
from .registry import REGISTRY, Method, Param, all_methods, get_method, merge_method
from .recipe import ModelEntry, Recipe, load_recipe, parse_recipe
from .stage import merge

__all__ = ["REGISTRY", "Method", "ModelEntry", "Param", "Recipe", "get_method", "load_recipe", "merge", "merge_method",
           "all_methods", "parse_recipe", "plan_merge"]
