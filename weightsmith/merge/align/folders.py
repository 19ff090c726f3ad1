"""``weightsmith align``: permute model B into model A's basis (weight or activation matching) and save it.

The aligned folder computes the same function as B; only the order of units inside each group changes.
"""
from __future__ import annotations

import time
from pathlib import Path

import torch

from ...checkpoint import (Checkpoint, ShardedWriter, check_output, copy_side_files, output_folder, save_state_dict,
                           write_config)
from ...checkpoint.card import write_model_card
from ...device import resolve_device
from ...errors import WeightsmithError
from ...progress import ProgressFn
from ...stage_options import AlignOptions
from ...data import calibration_windows
from .activation_matching import activation_matching
from .apply import permute_tensor
from .spec import PermSpec, spec_for
from .weight_matching import weight_matching

def lm_batches(tokenizer_from: str | Path, data: str | Path, *, max_tokens: int, seq_len: int,
               batch_size: int) -> list[torch.Tensor]:
    """Calibration batches: the text of ``data`` as one token stream cut into (batch, seq_len) windows."""
    from ...eval import load_tokenizer

    windows = calibration_windows(load_tokenizer(tokenizer_from), data, seq_len=seq_len, max_tokens=max_tokens)
    vocab = (Checkpoint(tokenizer_from).config or {}).get("vocab_size")
    if vocab and int(windows.max()) >= vocab:
        raise WeightsmithError(f"{tokenizer_from}: its tokenizer yields token id {int(windows.max())} but the model "
                               f"has vocab_size {vocab}; the tokenizer does not belong to this model")
    return list(windows.split(batch_size))


def check_pair(model_a: str | Path, model_b: str | Path) -> tuple[Checkpoint, Checkpoint]:
    """Both checkpoints through the loading gate, refused (before any tensor is read) unless every tensor has the
    same shape."""
    from ...checkpoint.trust import open_model

    ca, cb = open_model(model_a), open_model(model_b)
    if (ca.config or {}).get("model_type") != (cb.config or {}).get("model_type"):
        raise WeightsmithError(f"{model_a} and {model_b} have different model_type "
                               f"({(ca.config or {}).get('model_type')} vs {(cb.config or {}).get('model_type')})")
    for name in ca.names():
        if name not in cb.names() or ca.info(name).shape != cb.info(name).shape:
            raise WeightsmithError(f"tensor {name}: shape {ca.info(name).shape} in {model_a} but "
                                   f"{cb.info(name).shape if name in cb.names() else 'missing'} in {model_b}; "
                                   "alignment needs two models of one architecture and size")
    return ca, cb


def load_pair(model_a: str | Path, model_b: str | Path, device) -> tuple[torch.nn.Module, torch.nn.Module]:
    """Both models in float32 on ``device``, refused unless every tensor has the same shape."""
    from ... import loading

    check_pair(model_a, model_b)
    return (loading.load(model_a, device=device, dtype=torch.float32),
            loading.load(model_b, device=device, dtype=torch.float32))


def write_permuted(source: Checkpoint, spec: PermSpec, perms: dict[str, torch.Tensor], folder: Path,
                   out_shard_size: str) -> None:
    """``source``'s tensors permuted into ``folder`` one at a time, each in its stored dtype (a permutation
    only moves values), with its config and side files."""
    plan = [(n, source.info(n).torch_dtype, tuple(source.info(n).shape)) for n in source.names()]
    writer = ShardedWriter(folder, plan, out_shard_size)
    for name in source.names():
        t = source.map(name)
        writer.write(name, permute_tensor(t, spec.axes[name], perms).contiguous() if name in spec.axes else t)
        del t
    writer.close()
    write_config(folder, source.config)
    copy_side_files(source.path, folder)


def _match(model_a, model_b, o: AlignOptions, seed: int, dev, progress) -> tuple[PermSpec, dict[str, torch.Tensor]]:
    """Weight matching reads both checkpoints a group's tensors at a time (the models are never built);
    activation matching runs both models."""
    from ...loading import meta_model, stored_names

    ca, cb = check_pair(model_a, model_b)
    if o.method == "weight":
        skeleton = meta_model(ca, Path(model_a))
        spec = spec_for(skeleton)
        lazy = [c.lazy(stored_names(skeleton, c, Path(m), list(spec.axes))) for c, m in ((ca, model_a), (cb, model_b))]
        return spec, weight_matching(spec, *lazy, max_sweeps=o.max_sweeps, seed=seed, device=dev, progress=progress)
    a, b = load_pair(model_a, model_b, dev)
    spec = spec_for(a)
    batches = lm_batches(model_a, o.data, max_tokens=o.max_tokens, seq_len=o.seq_len, batch_size=o.batch_size)
    return spec, activation_matching(a, b, spec, batches, metric=o.metric, device=dev, progress=progress)


def save_like(model: torch.nn.Module, source: str | Path, folder: Path, config: dict, out_shard_size: str,
              keep_dtype: bool = True, side_files: bool = True) -> None:
    """Save ``model``'s weights (in the dtypes ``source`` stores them unless ``keep_dtype`` is off), with
    ``config`` and (unless ``side_files`` is off) ``source``'s side files (tokenizer, ...)."""
    ckpt = Checkpoint(source)
    stored = {n: ckpt.info(n).torch_dtype for n in ckpt.names()} if keep_dtype else {}
    state = {k: v.detach().to("cpu", stored.get(k, v.dtype)).contiguous() for k, v in model.state_dict().items()}
    if config.get("tie_word_embeddings"):
        state.pop("lm_head.weight", None)
    save_state_dict(state, folder, out_shard_size)
    write_config(folder, config)
    if side_files:
        copy_side_files(source, folder)


def _check_finite(model_a: str | Path, model_b: str | Path) -> None:
    """NaN/inf in either input is refused naming the model and tensor, one mapped tensor at a time: matching on
    such weights has no answer."""
    from ...checkpoint.values import finite, nonfinite_count

    for model in (model_a, model_b):
        ckpt = Checkpoint(model)
        for name in ckpt.names():
            t = ckpt.map(name)
            if t.is_floating_point() and not finite(t):
                raise WeightsmithError(f"{model}: tensor {name!r} holds {nonfinite_count(t)} NaN/inf value(s); units "
                                       "cannot be matched on non-finite weights: repair the input")


def align(model_a: str | Path, model_b: str | Path, out: str | Path, opts: AlignOptions | None = None, *,
          seed: int = 0, device: str = "auto", force: bool = False, progress: ProgressFn | None = None,
          **values) -> dict:
    """Write B permuted into A's basis to ``out``; returns a report (groups, units moved, seconds per stage).
    ``values`` override fields of ``opts`` (an :class:`AlignOptions`)."""
    o = AlignOptions.build(opts, **values)
    check_output(out, [model_a, model_b], force)
    _check_finite(model_a, model_b)
    dev = resolve_device(device)
    t0 = time.perf_counter()
    spec, perms = _match(model_a, model_b, o, seed, dev, progress)
    times = {"matching_s": round(time.perf_counter() - t0, 3)}
    moved = {g: int((p != torch.arange(len(p))).sum()) for g, p in perms.items()}
    report = {"model_a": str(model_a), "model_b": str(model_b), "out": str(out), "method": o.method,
              "metric": o.metric if o.method == "activation" else None, "groups": len(spec.groups),
              "units": sum(g.size for g in spec.groups.values()), "units_moved": sum(moved.values()), **times}
    with output_folder(out, [model_a, model_b], force, stage="align") as folder:
        write_permuted(Checkpoint(model_b), spec, perms, folder, o.out_shard_size)
        write_model_card(folder, stage="align", method=f"{o.method} matching", inputs=[str(model_a), str(model_b)],
                         parameters={**o.to_dict(exclude=("out_shard_size",)), "metric": report["metric"],
                                     "seed": seed},
                         notes=f"`{Path(model_b).name}` with its units permuted into the basis of "
                               f"`{Path(model_a).name}` (Git Re-Basin); it computes the same function as the original.")
    return report
