"""Fold plans (FoldGPT): which blocks go, how the kept ones group, and the folded model built from them.

Kept blocks are split into groups of adjacent blocks; a group shares one set of block weights,
initialised from the group average, its first or its middle member, or the member measured to cost least
(``share_init.best_members``); every block keeps its own norms.
"""
from __future__ import annotations

import torch

from ..errors import InvalidChoice, OptionError, OutOfRange, WeightsmithError
from ..stage_options import SHARE_INITS, share_sizes
from .blocks import block_list
from .format import assemble, block_prefix, folded_config, shared_keys

def removal_count(remove: float, n_blocks: int) -> int:
    if not 0 <= remove < 1:
        raise OutOfRange("remove", remove, 0, 1, hi_open=True)
    return int(round(remove * n_blocks))


def parse_share(share: str | int, n_kept: int) -> list[int]:
    """Group sizes from the ``share`` option: one size (repeated, the last group takes the rest) or a comma list
    summing to the kept count."""
    sizes = share_sizes(str(share))
    if len(sizes) == 1:
        g = sizes[0]
        return [min(g, n_kept - i) for i in range(0, n_kept, g)]
    if sum(sizes) != n_kept:
        raise OptionError("share", f"{str(share).strip()!r} sums to {sum(sizes)} but {n_kept} blocks are kept")
    return sizes


def groups_from_sizes(sizes: list[int]) -> list[list[int]]:
    out, start = [], 0
    for s in sizes:
        out.append(list(range(start, start + s)))
        start += s
    return out


def _share_source(members: list[torch.Tensor], init: str, pick: int = 0) -> torch.Tensor:
    if init == "best":
        return members[pick]
    if init == "average":
        if len(members) == 1:
            return members[0]
        total = members[0].to(torch.float32, copy=True)  # one float32 sum, not the group stacked
        for m in members[1:]:
            total += m.float()
        return (total / len(members)).to(members[0].dtype)
    if init == "first":
        return members[0]
    if init == "middle":
        return members[(len(members) - 1) // 2]
    raise InvalidChoice("share_init", init, SHARE_INITS)


@torch.no_grad()
def fold_model(model: torch.nn.Module, config: dict, removed: list[int], sizes: list[int], *,
               share_init: str = "average", relax_rank: int = 0, extra: dict | None = None,
               picks: list[int] | None = None) -> torch.nn.Module:
    """A new model holding the kept blocks of ``model``, grouped by ``sizes``, shared weights tied. It holds
    ``model``'s own tensors wherever a weight is taken unchanged (no copy): training it must give a parameter
    its own storage first (``heal`` does).
    ``share_init="best"`` takes ``picks``: for each group, the position of the member whose weights it shares
    (``share_init.best_members`` measures them)."""
    blocks = block_list(model)
    n = len(blocks)
    kept = [i for i in range(n) if i not in set(removed)]
    groups = groups_from_sizes(sizes)
    if share_init == "best" and (picks is None or len(picks) != len(groups)):
        raise WeightsmithError(f"share_init 'best' needs one measured member for each of the {len(groups)} groups")
    if sum(sizes) != len(kept):
        raise WeightsmithError(f"group sizes {sizes} do not cover the {len(kept)} kept blocks")
    prefix = block_prefix(model)
    keys = shared_keys(blocks[0])
    state = {k: v for k, v in model.state_dict().items() if not k.startswith(prefix)}
    for new_i, old_i in enumerate(kept):
        for k, v in blocks[old_i].state_dict().items():
            if k not in keys:
                state[f"{prefix}{new_i}.{k}"] = v
    for g, group in enumerate(groups):
        for k in keys:
            members = [blocks[kept[j]].state_dict()[k] for j in group]
            state[f"{prefix}{group[0]}.{k}"] = _share_source(members, share_init, picks[g] if picks else 0)
    fold_map = {"source_layers": n, "kept": kept, "removed": sorted(removed), "groups": groups,
                "block_prefix": prefix, "share_init": share_init, "relax_rank": relax_rank, **(extra or {})}
    if share_init == "best":
        fold_map["share_members"] = [kept[group[p]] for group, p in zip(groups, picks)]
    cfg = folded_config(config, kept, fold_map)
    folded = assemble(cfg, state, device=next(model.parameters()).device,
                      dtype=next(model.parameters()).dtype, fresh_relax=bool(relax_rank))
    if relax_rank:
        relax_init(folded, blocks, kept, groups, relax_rank)
    return folded


@torch.no_grad()
def relax_init(folded: torch.nn.Module, original_blocks, kept: list[int], groups: list[list[int]], rank: int) -> None:
    """Relaxed Recursive Transformers: block j's B A = truncated SVD of (W_j original - W_shared), and its bias
    residual = b_j original - b_shared (exact: at full rank every block is given back)."""
    from .format import RelaxedLinear

    new_blocks = block_list(folded)
    for group in groups:
        if len(group) < 2:
            continue
        for j in group:
            for name, mod in new_blocks[j].named_modules():
                if isinstance(mod, RelaxedLinear):
                    orig = original_blocks[kept[j]].get_submodule(name).weight.float()
                    u, s, vh = torch.linalg.svd(orig - mod.weight.float(), full_matrices=False)
                    r = min(rank, s.numel())
                    mod.lora_B.zero_()
                    mod.lora_A.zero_()
                    mod.lora_B[:, :r] = (u[:, :r] * s[:r]).to(mod.lora_B.dtype)
                    mod.lora_A[:r] = vh[:r].to(mod.lora_A.dtype)
                    if mod.bias is not None:
                        bias = original_blocks[kept[j]].get_submodule(name).bias
                        mod.lora_bias.copy_(bias.float() - mod.bias.float())
