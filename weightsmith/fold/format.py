"""The folded-model format: a checkpoint whose block groups share one set of weights (FoldGPT group
sharing), each shared tensor stored once, optionally with per-block low-rank residuals (Relaxed
Recursive Transformers). config.json carries the fold map under ``"weightsmith": {"format": "folded"}``.

Storage: block ``i`` of a group keeps its own norms; the group's shared tensors are stored only under
the group's first block; ``<linear>.lora_A``/``lora_B`` hold block i's relaxation (W_i = W_shared + B A)
and, where the layer has a bias, ``<linear>.lora_bias`` its bias residual (b_i = b_shared + lora_bias), so
that a full-rank relaxation gives back every block exactly. Folders written before the bias residual
existed load with it zero.
"""
from __future__ import annotations

import copy
from pathlib import Path

import torch

from ..checkpoint import (DEFAULT_SHARD_SIZE, Checkpoint, ShardedWriter, copy_side_files, output_folder,
                          save_state_dict, write_config)
from ..checkpoint.formats import copy_sentence_transformers_files, read_config
from ..checkpoint.layout import is_norm, num_layers
from ..errors import WeightsmithError
from ..progress import ProgressFn, track
from .blocks import block_list


class RelaxedLinear(torch.nn.Linear):
    """A linear layer whose (shared) weight gets this block's own low-rank residual, W + B A, and whose
    (shared) bias gets this block's own residual vector."""

    def __init__(self, base: torch.nn.Linear, rank: int):
        torch.nn.Module.__init__(self)
        self.in_features, self.out_features = base.in_features, base.out_features
        self.weight, self.bias = base.weight, base.bias
        dt, dev = base.weight.dtype, base.weight.device
        self.lora_A = torch.nn.Parameter(torch.zeros(rank, base.in_features, dtype=dt, device=dev))
        self.lora_B = torch.nn.Parameter(torch.zeros(base.out_features, rank, dtype=dt, device=dev))
        if base.bias is not None:
            self.lora_bias = torch.nn.Parameter(torch.zeros(base.out_features, dtype=dt, device=dev))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = super().forward(x) + (x @ self.lora_A.T) @ self.lora_B.T
        return out + self.lora_bias if self.bias is not None else out


def block_prefix(model: torch.nn.Module) -> str:
    blocks = block_list(model)
    return next(name for name, mod in model.named_modules() if mod is blocks) + "."


def shared_keys(block: torch.nn.Module) -> list[str]:
    """Names inside a block of the tensors a group shares: everything but the norms."""
    return [k for k, _ in block.named_parameters() if not is_norm(k) and "lora_" not in k]


def folded_config(config: dict, kept: list[int], fold_map: dict) -> dict:
    cfg = copy.deepcopy(config)
    key = next(k for k in ("num_hidden_layers", "n_layer", "num_layers") if isinstance(cfg.get(k), int))
    cfg[key] = len(kept)
    if isinstance(cfg.get("layer_types"), list):
        cfg["layer_types"] = [cfg["layer_types"][i] for i in kept]
    cfg["weightsmith"] = {"format": "folded", **fold_map}
    return cfg


def tie_groups(model: torch.nn.Module, groups: list[list[int]], relax_rank: int = 0) -> None:
    """Make every block of a group use the first block's shared Parameters (the same objects)."""
    blocks = block_list(model)
    for group in groups:
        head = blocks[group[0]]
        for key in shared_keys(head):
            mod_name, _, attr = key.rpartition(".")
            param = head.get_submodule(mod_name).get_parameter(attr) if mod_name else getattr(head, attr)
            for j in group[1:]:
                owner = blocks[j].get_submodule(mod_name) if mod_name else blocks[j]
                setattr(owner, attr, param)
        if relax_rank and len(group) > 1:
            for j in group:
                for key in shared_keys(blocks[j]):
                    mod_name, _, attr = key.rpartition(".")
                    mod = blocks[j].get_submodule(mod_name) if mod_name else None
                    if attr == "weight" and type(mod) is torch.nn.Linear:
                        parent_name, _, child = mod_name.rpartition(".")
                        parent = blocks[j].get_submodule(parent_name) if parent_name else blocks[j]
                        setattr(parent, child, RelaxedLinear(mod, relax_rank))


def assemble(config: dict, tensors: dict[str, torch.Tensor], device: torch.device | str = "cpu",
             dtype: torch.dtype | None = None, fresh_relax: bool = False) -> torch.nn.Module:
    """A transformers model for a folded config, its groups tied, loaded from ``tensors`` (shared ones stored once).

    ``fresh_relax``: the low-rank residuals are not in ``tensors`` yet (the caller initialises them).
    """
    from ..checkpoint.exact import config_object, model_class

    from accelerate import init_empty_weights

    fold = config["weightsmith"]
    cfg = config_object(config)
    with init_empty_weights(include_buffers=False):  # parameters on the meta device: no initialisation, no copy
        model = model_class(config)(cfg)
    tie_groups(model, fold["groups"], fold.get("relax_rank", 0))
    missing, unexpected = model.load_state_dict(tensors, strict=False, assign=True)  # the tensors themselves
    if unexpected:
        raise WeightsmithError(f"folded weights hold tensor {unexpected[0]!r} that the model has no place for")
    tie_groups(model, fold["groups"])  # assigning replaced the heads' parameters: the members take them again
    _tie_embeddings(model)
    state = model.state_dict(keep_vars=True)
    really_missing = [k for k in missing if state[k].is_meta and not (fresh_relax and "lora_" in k)
                      and not k.endswith(".lora_bias")]  # older folders: no bias residual, i.e. zero
    if really_missing:
        raise WeightsmithError(f"folded weights lack tensor {really_missing[0]!r}")
    _zero_meta(model)
    model.config.weightsmith = fold
    if dtype is not None:
        model.to(dtype)
    return model.to(device).eval()


def _tie_embeddings(model: torch.nn.Module) -> None:
    """Tie the output head to the input embeddings again where the config ties them (assigning tensors unties)."""
    if getattr(model.config, "tie_word_embeddings", False) and hasattr(model, "tie_weights"):
        model.tie_weights()


@torch.no_grad()
def _zero_meta(model: torch.nn.Module) -> None:
    """Low-rank residuals not stored (older folders: no bias residual) or not yet initialised: zero tensors beside
    their layer's weight."""
    for mod in model.modules():
        for name, p in list(mod.named_parameters(recurse=False)):
            if p.is_meta:
                like = mod.weight if isinstance(getattr(mod, "weight", None), torch.Tensor) else p
                setattr(mod, name, torch.nn.Parameter(torch.zeros(p.shape, dtype=like.dtype, device=like.device),
                                                      requires_grad=p.requires_grad))


def unique_state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """State dict with each tensor once, under the first name that refers to it."""
    seen, out = set(), {}
    for k, v in model.state_dict().items():
        if v.data_ptr() in seen:
            continue
        seen.add(v.data_ptr())
        out[k] = v.detach().contiguous()
    return out


def save(model: torch.nn.Module, folder: Path, config: dict, max_shard_size: str = "5GB") -> None:
    save_state_dict(unique_state(model), folder, max_shard_size)
    write_config(folder, config)


def load(path: str | Path, device: torch.device | str = "cpu", dtype: torch.dtype | None = None) -> torch.nn.Module:
    from ..checkpoint.exact import check_layer_count

    path = Path(path)
    config = read_config(path)
    ckpt = Checkpoint(path)
    members = {j for group in config["weightsmith"]["groups"] for j in group[1:]}
    check_layer_count(path, config, ckpt.names(), skip=members)
    try:
        return assemble(config, ckpt.state_dict(), device=device, dtype=dtype)
    except WeightsmithError as exc:
        raise WeightsmithError(f"{path}: {exc}") from None


def _plain_sources(config: dict, names: list[str]) -> dict[str, list[str]]:
    """Plain tensor name -> stored names it is made of: [shared], a weight's [shared, lora_A, lora_B] or a
    bias's [shared, lora_bias]."""
    fold = config["weightsmith"]
    prefix = fold["block_prefix"]
    first = {j: g[0] for g in fold["groups"] for j in g}
    head_keys = {g[0]: [n[len(f"{prefix}{g[0]}."):] for n in names if n.startswith(f"{prefix}{g[0]}.")]
                 for g in fold["groups"]}
    out: dict[str, list[str]] = {}
    for n in names:
        if not n.startswith(prefix):
            out[n] = [n]
    for j in range(num_layers(config)):
        for key in head_keys[first[j]]:
            if "lora_" in key:
                continue
            own = f"{prefix}{j}.{key}"
            src = own if own in names else f"{prefix}{first[j]}.{key}"
            mod = key.rpartition(".")[0]
            lora = [f"{prefix}{j}.{mod}.lora_A", f"{prefix}{j}.{mod}.lora_B"]
            residual = [f"{prefix}{j}.{mod}.lora_bias"]
            out[own] = [src] + (lora if key.endswith("weight") and lora[0] in names else
                                residual if key.endswith("bias") and residual[0] in names else [])
    return out


def export_plain(path: str | Path, out: str | Path, out_shard_size: int = DEFAULT_SHARD_SIZE,
                 force: bool = False, progress: ProgressFn | None = None) -> dict:
    """Write an ordinary checkpoint: shared weights duplicated into every block, relaxations merged in."""
    path = Path(path)
    config = read_config(path)
    if (config.get("weightsmith") or {}).get("format") != "folded":
        raise WeightsmithError(f"{path}: not a folded folder (config.json has no weightsmith.format = folded)")
    ckpt = Checkpoint(path)
    sources = _plain_sources(config, ckpt.names())
    plan = [(n, _torch_dtype(ckpt, s[0]), tuple(ckpt.info(s[0]).shape)) for n, s in sources.items()]
    plain_cfg = {k: v for k, v in config.items() if k != "weightsmith"}
    with output_folder(out, inputs=[path], force=force, stage="export") as tmp:
        writer = ShardedWriter(tmp, plan, out_shard_size)
        for name, src in track(progress, "export", list(sources.items())):
            t = ckpt.get(src[0])
            if len(src) == 3:
                t = (t.float() + ckpt.get(src[2]).float() @ ckpt.get(src[1]).float()).to(t.dtype)
            elif len(src) == 2:
                t = (t.float() + ckpt.get(src[1]).float()).to(t.dtype)
            writer.write(name, t)
        writer.close()
        write_config(tmp, plain_cfg)
        copy_side_files(path, tmp)
        copy_sentence_transformers_files(path, tmp)
    return {"out": str(out), "tensors": len(plan), "layers": num_layers(config)}


def _torch_dtype(ckpt: Checkpoint, name: str) -> torch.dtype:
    return ckpt.get(name).dtype


def describe(ckpt: Checkpoint) -> dict:
    """Unique (stored) parameters vs the parameters of the equivalent plain model."""
    config = ckpt.config
    sources = _plain_sources(config, ckpt.names())
    total = sum(ckpt.info(s[0]).numel for s in sources.values())
    fold = config["weightsmith"]
    return {"unique_params": ckpt.num_params, "total_params": total, "fold_groups": fold["groups"],
            "kept_blocks": fold["kept"], "source_blocks": fold["source_layers"]}
