"""I/O floor: read every tensor of N checkpoints and write one checkpoint of the same size.

Plain safetensors (load each shard, save each shard) is the floor every merge is measured
against; weightsmith's lazy reader + planned shard writer is timed beside it in the same run.
Inputs are random Llama checkpoints (cached); files are read warm from the page cache.

    python bench/io_floor.py --params 50M --models 4 --shard-size 100MB
"""
from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from weightsmith.checkpoint import Checkpoint, ShardedWriter  # noqa: E402
from weightsmith.zoo import cache_root  # noqa: E402


def llama_of(params: int) -> dict:
    """A Llama config of roughly ``params`` parameters (hidden h, 8 layers, 4h MLP, vocab 8192)."""
    h = 64
    while True:
        nxt = h + 64
        if 8 * (4 * nxt * nxt + 3 * nxt * 4 * nxt) + 2 * 8192 * nxt > params:
            break
        h = nxt
    return dict(hidden_size=h, intermediate_size=4 * h, num_hidden_layers=8, num_attention_heads=max(1, h // 64),
                num_key_value_heads=max(1, h // 64), vocab_size=8192, max_position_embeddings=256)


def count(text: str) -> int:
    """'220M' -> 220_000_000, '1.5B' -> 1_500_000_000."""
    scale = {"K": 10**3, "M": 10**6, "B": 10**9}.get(text[-1].upper(), 1)
    return int(float(text[:-1] if scale > 1 else text) * scale)


def make_inputs(params: int, n: int, shard: str) -> list[Path]:
    from weightsmith.zoo.synthetic import random_llama

    root = cache_root() / "bench" / f"io-{params}-{shard}"
    paths = []
    for i in range(n):
        p = root / f"m{i}"
        if not (p / "config.json").exists():
            random_llama(p, seed=i, shard_size=shard, **llama_of(params))
        paths.append(p)
    return paths


def plain_safetensors(inputs: list[Path], out: Path) -> float:
    """Read every shard of every input with safe_open, then save the first input's tensors again with save_file."""
    start = time.perf_counter()
    last = {}
    for folder in inputs:
        for f in sorted(folder.glob("*.safetensors")):
            with safe_open(str(f), framework="pt") as h:
                last[f.name] = {k: h.get_tensor(k) for k in h.keys()}
    for name, tensors in last.items():
        save_file(tensors, str(out / name))
    return time.perf_counter() - start


def weightsmith_io(inputs: list[Path], out: Path, shard: str) -> float:
    start = time.perf_counter()
    ckpts = [Checkpoint(p) for p in inputs]
    first = ckpts[0]
    writer = ShardedWriter(out, [(n, first.info(n).torch_dtype, first.info(n).shape) for n in first.names()], shard)
    for name in first.names():
        tensors = [c.get(name) for c in ckpts]
        writer.write(name, tensors[-1])
    writer.close()
    return time.perf_counter() - start


def main() -> None:
    import transformers

    transformers.utils.logging.disable_progress_bar()
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--params", default="50M", help="parameters per model, e.g. 50M or 220M (default 50M)")
    ap.add_argument("--models", type=int, default=4, help="number of input checkpoints (default 4)")
    ap.add_argument("--shard-size", default="100MB", help="shard size of inputs and output (default 100MB)")
    ap.add_argument("--repeat", type=int, default=3, help="runs of each, best kept (default 3)")
    args = ap.parse_args()
    params = count(args.params)
    inputs = make_inputs(params, args.models, args.shard_size)
    size = sum(f.stat().st_size for p in inputs for f in p.glob("*.safetensors"))
    floor, ours = [], []
    for _ in range(args.repeat):
        for fn, acc in ((plain_safetensors, floor), (weightsmith_io, ours)):
            with tempfile.TemporaryDirectory(dir=cache_root()) as d:
                acc.append(fn(inputs, Path(d)) if fn is plain_safetensors else fn(inputs, Path(d), args.shard_size))
    n_params = Checkpoint(inputs[0]).num_params
    print(f"inputs: {args.models} x {n_params / 1e6:.1f}M params, {size / 1e9:.2f} GB read, "
          f"{size / args.models / 1e9:.2f} GB written, shards {args.shard_size}, torch threads {torch.get_num_threads()}")
    print(f"{'':28}{'seconds':>10}{'GB/s':>8}{'ratio':>8}")
    for label, t in (("plain safetensors (floor)", min(floor)), ("weightsmith reader+writer", min(ours))):
        print(f"{label:28}{t:10.2f}{size * (1 + 1 / args.models) / t / 1e9:8.2f}{t / min(floor):8.2f}")


if __name__ == "__main__":
    main()
