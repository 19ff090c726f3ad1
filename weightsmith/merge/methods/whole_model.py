"""Methods that merge whole models or need data, declared here and run by their own modules, imported when they
run: greedy soup (``soup``: engine merges scored by ``weightsmith.eval``) and PLeaS (``pleas``: activation
alignment). PLeaS's parameters are ``PleasOptions``, the ``pleas`` command's options.
"""
from __future__ import annotations

from ...stage_options import PleasOptions
from ..registry import Param, merge_method, params_of


@merge_method("greedy_soup", title="Greedy soup", url="https://arxiv.org/abs/2203.05482", kind="whole_model",
              params=(Param("data", str, help="held-out text file scored by perplexity (lower is better)"),
                      Param("labelled", str, help="held-out labelled file scored by accuracy (higher is better)"),
                      Param("max_tokens", int, None, low=1, help="tokens of --data used for perplexity (default: all)"),
                      Param("compat", str, "paper", choices=("paper", "mergekit"), arg=None,
                            help="passed to the linear merges of the soup")),
              notes="ingredients join a uniform soup only if the held-out score improves")
def greedy_soup(recipe, out, **options) -> dict:
    """Greedy soup of the recipe's models (``soup.greedy_soup_recipe``)."""
    from ..soup import greedy_soup_recipe

    return greedy_soup_recipe(recipe, out, **options)


@merge_method("pleas", title="PLeaS", url="https://arxiv.org/abs/2407.02447", kind="whole_model",
              params=params_of(PleasOptions, skip=("out_shard_size",)), min_models=2, max_models=2,
              notes="two models; permutation alignment, partial merging and least squares need calibration data")
def pleas(recipe, out, **options) -> dict:
    """PLeaS of the recipe's two models (``pleas_stage.merge_recipe``)."""
    from ..pleas_stage import merge_recipe

    return merge_recipe(recipe, out, **options)
