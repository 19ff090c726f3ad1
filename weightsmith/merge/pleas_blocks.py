"""PLeaS on Llama-family checkpoints one decoder block at a time: neither model is ever built whole.

The calibration windows' hidden states go through one block of each model at a time, that block alone
upcast to float32. A first pass gathers the activation statistics and matches each block's groups as soon as
the block is done (the residual stream after the last); a second pass zips each block, refits its layers by
least squares in order (on the merged block's own inputs, or on both models' with ``inputs="original"``),
writes it and moves every model's hidden states on. The method is ``pleas.py``'s; only the order differs.
"""
from __future__ import annotations

import copy
from dataclasses import dataclass, replace

import torch
import torch.nn.functional as F
from torch import nn

from ..checkpoint import Checkpoint
from ..progress import ProgressFn, track
from .align.activation_matching import SimilarityStats, assign
from .align.capture import capture, stopped
from .align.spec import Layer, PermSpec
from .pleas import GroupPlan, _fix_sizes, _install, _Refit, _set_tensor, _zip_tensor, plan_group

BLOCKS = "model.layers."


@dataclass
class Pair:
    """What both passes share: the two checkpoints (parameter -> stored tensor names), the model on the meta
    device, its spec, the calibration batches and how blocks are run."""
    ckpts: tuple[Checkpoint, Checkpoint]
    names: tuple[dict[str, str], dict[str, str]]
    skeleton: nn.Module
    spec: PermSpec
    batches: list[torch.Tensor]
    device: torch.device

    def __post_init__(self) -> None:
        from accelerate import init_empty_weights

        with init_empty_weights(include_buffers=False):  # rotary tables real, weights never allocated
            self.runner = type(self.skeleton.model)(self.skeleton.config)
        self.runner.norm = nn.Identity()
        self.runner.rotary_emb.to(self.device)

    def run(self, block: nn.Module, h: torch.Tensor) -> torch.Tensor | None:
        """One block on hidden states, with the model's own causal mask and rotary embeddings (None when a
        stopping capture ended it)."""
        self.runner.layers = nn.ModuleList([block])
        out = stopped(self.runner, inputs_embeds=h, use_cache=False)
        return None if out is None else out.last_hidden_state

    def module(self, which: int, path: str) -> nn.Module:
        """Model ``which``'s submodule ``path`` with its weights read in float32 (the rest stays unread)."""
        mod = copy.deepcopy(self.skeleton.get_submodule(path))
        prefix = path + "."
        state = {n[len(prefix):]: self.ckpts[which].read(stored, dtype=torch.float32, device=self.device)
                 for n, stored in self.names[which].items() if n.startswith(prefix)}
        mod.load_state_dict(state, assign=True)
        return mod.eval()

    def embed(self, which: int) -> list[torch.Tensor]:
        table = self.ckpts[which].map(self.names[which]["model.embed_tokens.weight"])
        return [F.embedding(b, table).to(self.device, torch.float32) for b in self.batches]

    def layers(self, l: int | None) -> list[Layer]:
        """Block ``l``'s refit layers named inside the block (None: the layers after the last block)."""
        if l is None:
            return [lay for lay in self.spec.layers if not lay.module.startswith(BLOCKS)]
        prefix = f"{BLOCKS}{l}."
        return [replace(lay, module=lay.module[len(prefix):]) for lay in self.spec.layers
                if lay.module.startswith(prefix)]

    @property
    def depth(self) -> int:
        return len(self.skeleton.model.layers)


def _plans(stats: SimilarityStats, groups: list[str], counts: dict[str, int]) -> dict[str, GroupPlan]:
    sims = stats.similarity(groups)
    perms = assign(sims)
    return {g: plan_group(perms[g], counts[g], sims[g]) for g in groups}


@torch.no_grad()
def match_blocks(pair: Pair, counts: dict[str, int], metric: str,
                 progress: ProgressFn | None = None) -> dict[str, GroupPlan]:
    """Activation statistics block by block; each block's groups are matched once it is done."""
    stats = SimilarityStats(pair.spec, metric, pair.device)
    hs = [pair.embed(0), pair.embed(1)]
    plans: dict[str, GroupPlan] = {}
    for l in track(progress, "activation statistics", range(pair.depth)):
        blocks = [pair.module(w, f"{BLOCKS}{l}") for w in (0, 1)]
        local = pair.layers(l)
        with capture(blocks[0], local) as acts_a, capture(blocks[1], local) as acts_b:
            for i in range(len(pair.batches)):
                for w in (0, 1):
                    hs[w][i] = pair.run(blocks[w], hs[w][i])
                stats.add(local, acts_a, acts_b)
        plans.update(_plans(stats, [g for g in pair.spec.groups if g.startswith(f"{BLOCKS}{l}.")], counts))
    tail = pair.layers(None)
    if tail:
        norms = [pair.module(w, "model.norm") for w in (0, 1)]
        for i in range(len(pair.batches)):
            acts = [{lay.module: [norm(hh[i]).reshape(-1, hh[i].shape[-1]), None] for lay in tail}
                    for norm, hh in zip(norms, hs)]
            stats.add(tail, *acts)
    plans.update(_plans(stats, [g for g in pair.spec.groups if g not in plans], counts))
    return {g: plans[g] for g in pair.spec.groups}


def merged_shape(spec: PermSpec, plans: dict[str, GroupPlan], name: str, shape: tuple[int, ...]) -> tuple[int, ...]:
    out = list(shape)
    for ax in spec.axes.get(name, []):
        out[ax.dim] = plans[ax.group].width * ax.block
    return tuple(out)


def _zip_module(pair: Pair, mods: list[nn.Module], path: str, plans: dict[str, GroupPlan]) -> nn.Module:
    """The merged module at ``path`` from A's and B's (matched units averaged, separate ones side by side)."""
    layer_weights = {f"{lay.module}.{p}" for lay in pair.spec.layers for p in ("weight", "bias")}
    merged = copy.deepcopy(pair.skeleton.get_submodule(path))
    state_b = dict(mods[1].named_parameters())
    for name, ta in mods[0].named_parameters():
        full = f"{path}.{name}"
        _set_tensor(merged, name, _zip_tensor(ta, state_b[name], pair.spec.axes[full], plans, full in layer_weights))
    _fix_sizes(merged)
    return merged.eval()


@dataclass
class Refit:
    """How layers are refit: ``least_squares`` off gives the zip alone."""
    least_squares: bool
    inputs: str
    ridge: float
    rows_per_batch: int
    seed: int


def _refit_block(pair: Pair, blocks: list[nn.Module], merged: nn.Module, hs: list[list[torch.Tensor]],
                 plans: dict[str, GroupPlan], how: Refit, local: list[Layer]) -> None:
    """Refit the block's layers in order and move all three models' hidden states past it."""
    targets = []
    with capture(blocks[0], local, raw=True) as acts_a, capture(blocks[1], local, raw=True) as acts_b:
        for i in range(len(pair.batches)):
            for w in (0, 1):
                hs[w][i] = pair.run(blocks[w], hs[w][i])
            targets.append((dict(acts_a), dict(acts_b)))
    mods_a, mods_m = dict(blocks[0].named_modules()), dict(merged.named_modules())
    for lay in local if how.least_squares else []:
        refit = _Refit(lay, mods_a[lay.module], plans, pair.device, torch.float32, how.rows_per_batch, how.seed)
        if how.inputs == "merged":
            with capture(merged, [lay], raw=True, stop=True) as acts_m:
                for i, (ta, tb) in enumerate(targets):
                    pair.run(merged, hs[2][i])
                    refit.add(ta[lay.module], tb[lay.module], merged_input=acts_m[lay.module][0])
        else:
            for ta, tb in targets:
                refit.add(ta[lay.module], tb[lay.module])
        _install(mods_m, lay, *refit.solve(how.ridge), {})
    for i in range(len(pair.batches)):
        hs[2][i] = pair.run(merged, hs[2][i])


def _refit_tail(pair: Pair, hs: list[list[torch.Tensor]], plans: dict[str, GroupPlan], how: Refit,
                write) -> None:
    """The final norm and (untied) head: the head refit on the merged model's normalised hidden states."""
    norms = [pair.module(w, "model.norm") for w in (0, 1)]
    norm = _zip_module(pair, norms, "model.norm", plans)
    write("model.norm", norm)
    for lay in pair.layers(None):
        heads = [pair.module(w, lay.module) for w in (0, 1)]
        head = _zip_module(pair, heads, lay.module, plans)
        if how.least_squares:
            refit = _Refit(lay, heads[0], plans, pair.device, torch.float32, how.rows_per_batch, how.seed)
            for i in range(len(pair.batches)):
                io = [[n(hh[i]), None] for n, hh in zip(norms, hs[:2])]
                for pair_io, h in zip(io, heads):
                    pair_io[1] = h(pair_io[0])
                x = norm(hs[2][i]) if how.inputs == "merged" else None
                refit.add(io[0], io[1], merged_input=x)
            _install({lay.module: head}, replace(lay, module=lay.module), *refit.solve(how.ridge), {})
        write(lay.module, head)


@torch.no_grad()
def merge_blocks(pair: Pair, plans: dict[str, GroupPlan], how: Refit, write, progress: ProgressFn | None = None) -> None:
    """Zip, refit and ``write(path, module)`` every block, then the embedding, final norm and head."""
    hs = [pair.embed(0), pair.embed(1)]
    embeds = [pair.module(w, "model.embed_tokens") for w in (0, 1)]
    embed = _zip_module(pair, embeds, "model.embed_tokens", plans)
    hs.append([embed(b.to(pair.device)) for b in pair.batches])
    write("model.embed_tokens", embed)
    del embeds, embed
    for l in track(progress, "least squares per block", range(pair.depth)):
        path = f"{BLOCKS}{l}"
        blocks = [pair.module(w, path) for w in (0, 1)]
        merged = _zip_module(pair, blocks, path, plans)
        _refit_block(pair, blocks, merged, hs, plans, how, pair.layers(l))
        write(path, merged)
    _refit_tail(pair, hs, plans, how, write)
