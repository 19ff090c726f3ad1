"""Same TIES merge (density 0.3) of a random Llama base + 3 perturbed fine-tunes by weightsmith and by mergekit.

Measures wall time and peak RSS of both as child processes the same way (/usr/bin/time -v when present,
else resource.getrusage of children), plus the I/O floor: read all four inputs and write one output
with plain safetensors. weightsmith trims per tensor, as mergekit does (trim: tensor); it runs again
with the paper's whole-model trim (its default, one more reading pass) and with its native kernels off
(WEIGHTSMITH_NATIVE=0). The floor and weightsmith runs are interleaved --repeat times and the best wall
of each is reported (this machine is noisy). Checkpoints are built once and cached under the weightsmith
cache directory, and read once before the timed runs so that every run finds them in the page cache.

    python bench/merge_vs_mergekit.py                 # ~220M params, 300 MB shards
    python bench/merge_vs_mergekit.py --params 30M    # quick run
"""
from __future__ import annotations

import argparse
import json
import os
import re
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

from weightsmith.checkpoint import Checkpoint, ShardedWriter, parse_size, write_config
from weightsmith.zoo.build import cache_root

FINETUNES = ("ft-a", "ft-b", "ft-c")


def llama_config(params: int) -> dict:
    """A Llama config of roughly ``params`` parameters (untied head), growing depth at a fixed width."""
    hidden, inter, vocab = (1024, 2816, 32000) if params >= 100e6 else (512, 1408, 8000)
    per_layer = 4 * hidden * hidden + 3 * hidden * inter + 2 * hidden
    layers = max(1, round((params - 2 * vocab * hidden) / per_layer))
    return {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": hidden,
            "intermediate_size": inter, "num_hidden_layers": layers, "num_attention_heads": hidden // 64,
            "num_key_value_heads": hidden // 64, "vocab_size": vocab, "max_position_embeddings": 2048,
            "rms_norm_eps": 1e-6, "tie_word_embeddings": False, "hidden_act": "silu", "dtype": "float32"}


def llama_shapes(cfg: dict) -> list[tuple[str, tuple[int, ...]]]:
    h, i, v = cfg["hidden_size"], cfg["intermediate_size"], cfg["vocab_size"]
    out = [("model.embed_tokens.weight", (v, h))]
    for layer in range(cfg["num_hidden_layers"]):
        p = f"model.layers.{layer}."
        out += [(p + "self_attn.q_proj.weight", (h, h)), (p + "self_attn.k_proj.weight", (h, h)),
                (p + "self_attn.v_proj.weight", (h, h)), (p + "self_attn.o_proj.weight", (h, h)),
                (p + "mlp.gate_proj.weight", (i, h)), (p + "mlp.up_proj.weight", (i, h)),
                (p + "mlp.down_proj.weight", (h, i)), (p + "input_layernorm.weight", (h,)),
                (p + "post_attention_layernorm.weight", (h,))]
    return out + [("model.norm.weight", (h,)), ("lm_head.weight", (v, h))]


def build_models(params: int, shard: str) -> dict[str, Path]:
    cfg = llama_config(params)
    root = cache_root() / "bench" / f"merge-llama-{params}-{shard}"
    names = ("base", *FINETUNES)
    paths = {n: root / n for n in names}
    if all((p / "config.json").exists() for p in paths.values()):
        return paths
    shutil.rmtree(root, ignore_errors=True)
    shapes = llama_shapes(cfg)
    writers = {}
    for n in names:
        paths[n].mkdir(parents=True)
        writers[n] = ShardedWriter(paths[n], [(k, torch.float32, s) for k, s in shapes], shard)
    for idx, (k, s) in enumerate(shapes):
        g = torch.Generator().manual_seed(idx)
        base = torch.ones(s) if k.endswith("norm.weight") else torch.randn(s, generator=g) * 0.02
        writers["base"].write(k, base)
        for j, n in enumerate(FINETUNES):
            writers[n].write(k, base + torch.randn(s, generator=g) * 0.002 * (j + 1))
    for n in names:
        writers[n].close()
        write_config(paths[n], cfg)
    return paths


def measure(cmd: list[str], env: dict) -> dict:
    """Wall seconds and peak RSS (MB) of one child process."""
    if shutil.which("time") or Path("/usr/bin/time").exists():
        with tempfile.NamedTemporaryFile("r", suffix=".txt") as log:
            start = time.perf_counter()
            proc = subprocess.run(["/usr/bin/time", "-v", "-o", log.name, *cmd], env=env, capture_output=True, text=True)
            wall = time.perf_counter() - start
            text = Path(log.name).read_text()
        rss = int(re.search(r"Maximum resident set size \(kbytes\): (\d+)", text).group(1)) / 1024
    else:
        before = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
        start = time.perf_counter()
        proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
        wall = time.perf_counter() - start
        rss = max(before, resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss) / 1024
    if proc.returncode != 0:
        raise SystemExit(f"{cmd[0]} failed:\n{proc.stderr[-3000:]}")
    return {"wall_s": wall, "rss_mb": rss}


IO_FLOOR = """
import sys, time
from pathlib import Path
from safetensors.torch import load_file, save_file
inputs, out, shard = sys.argv[1:-2], Path(sys.argv[-2]), int(sys.argv[-1])
first = {}
for i, folder in enumerate(inputs):
    for f in sorted(Path(folder).glob("*.safetensors")):
        part = load_file(f)
        if i == 0:
            first.update(part)
        else:
            for t in part.values():
                t.sum()
        del part
out.mkdir(parents=True, exist_ok=True)
batch, size, n = {}, 0, 0
for k, t in first.items():
    batch[k] = t; size += t.numel() * 4
    if size >= shard:
        save_file(batch, str(out / f"part-{n}.safetensors")); batch, size, n = {}, 0, n + 1
if batch:
    save_file(batch, str(out / f"part-{n}.safetensors"))
"""


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--params", default="220M", help="model size, e.g. 220M or 30M (default: 220M)")
    ap.add_argument("--shard", default="300MB", help="input and output shard size (default: 300MB)")
    ap.add_argument("--density", type=float, default=0.3)
    ap.add_argument("--skip-mergekit", action="store_true", help="time weightsmith and the I/O floor only")
    ap.add_argument("--repeat", type=int, default=3,
                    help="runs of the floor and of weightsmith, interleaved; the best wall is reported (default: 3)")
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()
    params = int(float(args.params.rstrip("MmBb")) * (1e9 if args.params[-1] in "Bb" else 1e6))
    paths = build_models(params, args.shard)
    n_params = Checkpoint(paths["base"]).num_params
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    # mergekit trims each tensor on its own: so does weightsmith here (trim: tensor); the paper's whole-model
    # trim (weightsmith's default) is timed as its own row
    recipe = {"merge_method": "ties", "base_model": str(paths["base"]), "dtype": "float32",
              "parameters": {"density": args.density, "weight": 1.0, "trim": "tensor"},
              "models": [{"model": str(paths[n])} for n in FINETUNES]}
    paper = {**recipe, "parameters": {**recipe["parameters"], "trim": "model"}}
    bindir = Path(sys.executable).parent
    rows = {}
    # Every run reads the inputs warm from the page cache: the first one timed must not pay for the disk.
    for folder in paths.values():
        for f in Path(folder).glob("*.safetensors"):
            with open(f, "rb") as fh:
                while fh.read(1 << 24):
                    pass
    with tempfile.TemporaryDirectory(prefix="merge-bench-", dir=cache_root()) as tmp:
        tmp = Path(tmp)
        (tmp / "ties.yaml").write_text(json.dumps(recipe))
        (tmp / "ties-paper.yaml").write_text(json.dumps(paper))
        runs = {
            "I/O floor (safetensors)": lambda out: (
                [sys.executable, "-c", IO_FLOOR, *(str(p) for p in paths.values()), str(out),
                 str(parse_size(args.shard))], env),
            "weightsmith merge": lambda out: (
                [str(bindir / "weightsmith"), "merge", str(tmp / "ties.yaml"), "-o", str(out), "--device", "cpu",
                 "--out-shard-size", args.shard, "--quiet"], env),
            "  trim: model (paper)": lambda out: (
                [str(bindir / "weightsmith"), "merge", str(tmp / "ties-paper.yaml"), "-o", str(out), "--device", "cpu",
                 "--out-shard-size", args.shard, "--quiet"], env),
            "  native kernels off": lambda out: (
                [str(bindir / "weightsmith"), "merge", str(tmp / "ties.yaml"), "-o", str(out), "--device", "cpu",
                 "--out-shard-size", args.shard, "--quiet"], {**env, "WEIGHTSMITH_NATIVE": "0"}),
        }
        # interleaved, best wall of --repeat runs each (peak RSS: the largest seen)
        for r in range(args.repeat):
            for name, command in runs.items():
                out = tmp / f"run-{r}-{len(rows.get(name, []))}-{name.split()[0]}"
                got = measure(*command(out))
                rows.setdefault(name, []).append(got)
                if not (r == args.repeat - 1 and name == "weightsmith merge"):
                    shutil.rmtree(out, ignore_errors=True)
                else:
                    shutil.move(str(out), tmp / "ws")
        rows = {name: {"wall_s": min(g["wall_s"] for g in got), "rss_mb": max(g["rss_mb"] for g in got),
                       "runs": len(got)} for name, got in rows.items()}
        if not args.skip_mergekit:
            # mergekit counts shard size in parameters, not bytes (float32: 4 bytes each).
            rows["mergekit-yaml"] = measure(
                [str(bindir / "mergekit-yaml"), str(tmp / "ties.yaml"), str(tmp / "mk"), "--out-shard-size",
                 str(parse_size(args.shard) // 4), "--no-copy-tokenizer"], env)
            a, b = Checkpoint(tmp / "ws"), Checkpoint(tmp / "mk")
            diffs = [(a.get(n) - b.get(n)).abs() for n in a.names()]
            rows["mergekit-yaml"]["max_abs_diff_vs_weightsmith"] = max(d.max().item() for d in diffs)
            # Differences come only from equal |delta| at a top-k threshold, which mergekit breaks by sort order.
            rows["mergekit-yaml"]["entries_differing"] = sum(int((d > 1e-6).sum()) for d in diffs)
            del diffs
    ws = rows["weightsmith merge"]
    summary = {"params": n_params, "shard": args.shard, "rows": rows,
               "weightsmith_vs_floor": ws["wall_s"] / rows["I/O floor (safetensors)"]["wall_s"]}
    if "mergekit-yaml" in rows:
        summary["wall_ratio_vs_mergekit"] = ws["wall_s"] / rows["mergekit-yaml"]["wall_s"]
        summary["rss_ratio_vs_mergekit"] = ws["rss_mb"] / rows["mergekit-yaml"]["rss_mb"]
    if args.json:
        print(json.dumps(summary, indent=2))
        return
    print(f"TIES density {args.density}, base + 3 fine-tunes, {n_params / 1e6:.1f}M params each, {args.shard} shards; "
          f"best of {args.repeat} runs (mergekit: 1)")
    print(f"{'run':<26}{'wall s':>10}{'peak RSS MB':>14}")
    for name, r in rows.items():
        print(f"{name:<26}{r['wall_s']:>10.1f}{r['rss_mb']:>14.0f}")
    print(f"weightsmith / I/O floor wall: {summary['weightsmith_vs_floor']:.2f}x")
    if "mergekit-yaml" in rows:
        print(f"weightsmith / mergekit wall: {summary['wall_ratio_vs_mergekit']:.2f}x, "
              f"peak RSS: {summary['rss_ratio_vs_mergekit']:.2f}x, "
              f"max |diff|: {rows['mergekit-yaml']['max_abs_diff_vs_weightsmith']:.2e} "
              f"in {rows['mergekit-yaml']['entries_differing']} of {4 * n_params // 4} entries (threshold ties)")


if __name__ == "__main__":
    main()
