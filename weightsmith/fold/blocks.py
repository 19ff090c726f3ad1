"""Where the repeated blocks of a loaded transformers model live and how their residual branches are named.

Shared by the analysis (hooks on block inputs), the FoldGPT gates (scaling each residual branch)
and the fold itself (rebuilding the block list with shared weights).
"""
from __future__ import annotations

import torch

from ..errors import WeightsmithError

# model_type -> names (inside one block) of the modules whose outputs are the residual branches F_i(x)
BRANCHES = {
    "llama": ("self_attn", "mlp"), "mistral": ("self_attn", "mlp"), "qwen2": ("self_attn", "mlp"),
    "qwen3": ("self_attn", "mlp"), "gpt2": ("attn", "mlp"),
    "bert": ("attention.output.dense", "output.dense"), "roberta": ("attention.output.dense", "output.dense"),
}
_LIST_NAMES = ("layers", "h", "layer")


def block_list(model: torch.nn.Module) -> torch.nn.ModuleList:
    """The ModuleList holding the model's transformer blocks."""
    n = model.config.num_hidden_layers
    for name, mod in model.named_modules():
        if isinstance(mod, torch.nn.ModuleList) and len(mod) == n and name.split(".")[-1] in _LIST_NAMES:
            return mod
    raise WeightsmithError(f"{type(model).__name__}: found no list of {n} blocks (model_type "
                           f"{model.config.model_type!r} is not supported by fold/analyze)")


def branch_modules(model: torch.nn.Module, block: torch.nn.Module) -> list[torch.nn.Module]:
    mt = model.config.model_type
    if mt not in BRANCHES:
        raise WeightsmithError(f"model_type {mt!r} has no known residual branches; supported: {', '.join(sorted(BRANCHES))}")
    return [block.get_submodule(name) for name in BRANCHES[mt]]


def is_causal_lm(model: torch.nn.Module) -> bool:
    return hasattr(model, "lm_head") or type(model).__name__.endswith("LMHeadModel")


def first_tensor(out):
    return out[0] if isinstance(out, (tuple, list)) else out


def scale_output(out, g: torch.Tensor):
    """``out`` (a tensor or a tuple whose first item is the branch output) with that output times ``g``."""
    if isinstance(out, tuple):
        return (out[0] * g,) + tuple(out[1:])
    return out * g
