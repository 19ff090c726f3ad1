"""Same TIES merge (density 0.3) of a random Llama base + 3 perturbed fine-tunes by weightsmith and by mergekit.

Measures wall time and peak RSS of both as child processes the same way (/usr/bin/time -v when present,
else resource.getrusage of children), plus the I/O floor: read all four inputs and write one output
with plain safetensors. weightsmith trims per tensor, as mergekit does (trim: tensor); it runs again
with the paper's whole-model trim (its default, one more reading pass), with --compat mergekit
(mergekit's choice among tied magnitudes at each cut) and with its native kernels off
(WEIGHTSMITH_NATIVE=0). The bf16 rows run the same recipe with ``dtype: bfloat16`` (arithmetic in
bfloat16, as mergekit) by mergekit and by weightsmith --compat mergekit; their outputs are compared. The floor and weightsmith runs are interleaved --repeat times and the best wall
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
    kv = h // cfg["num_attention_heads"] * cfg.get("num_key_value_heads", cfg["num_attention_heads"])
    out = [("model.embed_tokens.weight", (v, h))]
    for layer in range(cfg["num_hidden_layers"]):
        p = f"model.layers.{layer}."
        out += [(p + "self_attn.q_proj.weight", (h, h)), (p + "self_attn.k_proj.weight", (kv, h)),
                (p + "self_attn.v_proj.weight", (kv, h)), (p + "self_attn.o_proj.weight", (h, h)),
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
    compat = {**recipe, "parameters": {**recipe["parameters"], "compat": "mergekit"}}
    compat_bf16 = {**compat, "dtype": "bfloat16"}
    mergekit_bf16 = {**recipe, "dtype": "bfloat16"}
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
        (tmp / "ties-compat.yaml").write_text(json.dumps(compat))
        (tmp / "ties-compat-bf16.yaml").write_text(json.dumps(compat_bf16))
        (tmp / "ties-bf16.yaml").write_text(json.dumps(mergekit_bf16))

        def ws(name: str, extra_env: dict | None = None):
            return lambda out: ([str(bindir / "weightsmith"), "merge", str(tmp / name), "-o", str(out), "--device", "cpu",
                                 "--out-shard-size", args.shard, "--quiet"], {**env, **(extra_env or {})})
        runs = {
            "I/O floor (safetensors)": lambda out: (
                [sys.executable, "-c", IO_FLOOR, *(str(p) for p in paths.values()), str(out),
                 str(parse_size(args.shard))], env),
            "weightsmith merge": ws("ties.yaml"),
            "  trim: model (paper)": ws("ties-paper.yaml"),
            "  --compat mergekit": ws("ties-compat.yaml"),
            "  native kernels off": ws("ties.yaml", {"WEIGHTSMITH_NATIVE": "0"}),
            "bf16 --compat mergekit": ws("ties-compat-bf16.yaml"),
        }
        keep = {"weightsmith merge": "ws", "  --compat mergekit": "ws-compat", "bf16 --compat mergekit": "ws-bf16"}
        # interleaved, best wall of --repeat runs each (peak RSS: the largest seen)
        for r in range(args.repeat):
            for name, command in runs.items():
                out = tmp / f"run-{r}-{len(rows.get(name, []))}-{name.split()[0]}"
                got = measure(*command(out))
                rows.setdefault(name, []).append(got)
                if not (r == args.repeat - 1 and name in keep):
                    shutil.rmtree(out, ignore_errors=True)
                else:
                    shutil.move(str(out), tmp / keep[name])
        rows = {name: {"wall_s": min(g["wall_s"] for g in got), "rss_mb": max(g["rss_mb"] for g in got),
                       "runs": len(got)} for name, got in rows.items()}
        if not args.skip_mergekit:
            # mergekit counts shard size in parameters, not bytes (float32: 4 bytes each).
            for name, yaml_name, ours, mine in (("mergekit-yaml", "ties.yaml", "ws", "ws-compat"),
                                                ("mergekit-yaml bf16", "ties-bf16.yaml", "ws-bf16", None)):
                out = tmp / f"mk-{yaml_name}"
                rows[name] = measure([str(bindir / "mergekit-yaml"), str(tmp / yaml_name), str(out), "--out-shard-size",
                                      str(parse_size(args.shard) // 4), "--no-copy-tokenizer"], env)
                b = Checkpoint(out)
                for label, folder in (("weightsmith", ours), ("compat", mine)):
                    if folder is None:
                        continue
                    a = Checkpoint(tmp / folder)
                    diffs = [(a.get(n).float() - b.get(n).float()).abs() for n in a.names()]
                    rows[name][f"max_abs_diff_vs_{label}"] = max(d.max().item() for d in diffs)
                    # trim: tensor differs only where equal |delta| meet a top-k cut (mergekit breaks those by
                    # sort order; --compat mergekit follows it)
                    rows[name][f"entries_differing_{label}"] = sum(int((d > 0).sum()) for d in diffs)
                    del diffs
                shutil.rmtree(out, ignore_errors=True)
    ws = rows["weightsmith merge"]
    floor = rows["I/O floor (safetensors)"]["wall_s"]
    summary = {"params": n_params, "shard": args.shard, "rows": rows, "weightsmith_vs_floor": ws["wall_s"] / floor}
    pairs = {"mergekit-yaml": [n for n in rows if not n.startswith(("bf16", "I/O", "mergekit"))],
             "mergekit-yaml bf16": ["bf16 --compat mergekit"]}
    ratios = {}
    for mk, names in pairs.items():
        if mk in rows:
            for name in names:
                ratios[name.strip()] = {"wall": rows[name]["wall_s"] / rows[mk]["wall_s"],
                                        "rss": rows[name]["rss_mb"] / rows[mk]["rss_mb"]}
    summary["vs_mergekit"] = ratios
    if args.json:
        print(json.dumps(summary, indent=2))
        return
    print(f"TIES density {args.density}, base + 3 fine-tunes, {n_params / 1e6:.1f}M params each, {args.shard} shards; "
          f"best of {args.repeat} runs (mergekit: 1)")
    print(f"{'run':<26}{'wall s':>10}{'peak RSS MB':>14}{'wall vs mk':>12}{'RSS vs mk':>11}")
    for name, r in rows.items():
        ratio = ratios.get(name.strip())
        tail = f"{ratio['wall']:>11.2f}x{ratio['rss']:>10.2f}x" if ratio else ""
        print(f"{name:<26}{r['wall_s']:>10.1f}{r['rss_mb']:>14.0f}{tail}")
    print(f"weightsmith / I/O floor wall: {summary['weightsmith_vs_floor']:.2f}x")
    for mk in pairs:
        if mk in rows:
            diffs = {k.removeprefix("entries_differing_"): v for k, v in rows[mk].items() if k.startswith("entries_")}
            print(f"{mk}: entries differing from " + ", ".join(f"{k} {v}" for k, v in diffs.items())
                  + f" (of {4 * n_params // 4})")

if __name__ == "__main__":
    main()
