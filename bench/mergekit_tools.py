"""weightsmith extract-lora / moe beside mergekit-extract-lora / mergekit-moe 0.1.5 on the same inputs, in one run.

A random Llama base and three perturbed fine-tunes (the merge benchmark's models, cached), each tool as a
child process measured the same way (wall seconds, peak RSS). extract-lora: one fine-tune against the base at
--max-rank; weightsmith runs with its exact SVD (mergekit's arithmetic), auto (randomized where the rank is
small and the spectrum falls off after it, which these dense-noise deltas do not: exact) and the randomized
SVD forced. moe: the base and the three fine-tunes as four experts of a Mixtral, random gates
and hidden gates (the base run on one prompt per expert in bfloat16). Outputs are compared: the largest
|B·A difference| relative to mergekit's, the truncation residual relative to mergekit's (the optimum), and
whether the MoE tensors are bit-equal.

    python bench/mergekit_tools.py                 # ~100M-param inputs
    python bench/mergekit_tools.py --params 30M    # quick run
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
from pathlib import Path

import torch
from safetensors.torch import load_file

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from merge_vs_mergekit import FINETUNES, build_models, measure  # noqa: E402
from mergekit_configs import _tokenizer  # noqa: E402

from weightsmith.checkpoint import Checkpoint  # noqa: E402
from weightsmith.zoo.build import cache_root  # noqa: E402


def lora_products(folder: Path) -> dict[str, torch.Tensor]:
    t = load_file(folder / "adapter_model.safetensors")
    return {k[: -len(".lora_A.weight")]: t[k.replace("lora_A", "lora_B")].float() @ v.float()
            for k, v in t.items() if k.endswith(".lora_A.weight")}


def compare_adapters(ours: Path, ref: Path, paths: dict) -> dict:
    """max over modules of max|B·A (ours) − B·A (ref)| / max|B·A (ref)|, and of the truncation residual
    ‖Δ − B·A‖_F of ours over the reference's (1.0: as good an approximation; mergekit's is the exact optimum)."""
    pa, pb = lora_products(ours), lora_products(ref)
    assert pa.keys() == pb.keys()
    ft, base = Checkpoint(paths["ft-a"]), Checkpoint(paths["base"])
    gap, ratio = 0.0, 0.0
    for k in pb:
        name = k.removeprefix("base_model.model.") + ".weight"
        delta = ft.read(name, dtype=torch.float32) - base.read(name, dtype=torch.float32)
        gap = max(gap, ((pa[k] - pb[k]).abs().max() / pb[k].abs().max()).item())
        ratio = max(ratio, (torch.linalg.norm(delta - pa[k]) / torch.linalg.norm(delta - pb[k])).item())
    return {"max_rel_gap_BA": gap, "residual_ratio": ratio}


def same_tensors(a: Path, b: Path) -> bool:
    ta, tb = {}, {}
    for folder, into in ((a, ta), (b, tb)):
        for f in sorted(folder.glob("*.safetensors")):
            into.update(load_file(f))
    return ta.keys() == tb.keys() and all(torch.equal(ta[k], tb[k]) for k in ta)


def moe_config(paths: dict[str, Path], gate_mode: str) -> dict:
    names = ("base", *FINETUNES)
    return {"base_model": str(paths["base"]), "gate_mode": gate_mode, "dtype": "float32", "experts": [
        {"source_model": str(paths[n]), "positive_prompts": [f"_tok_{10 + 7 * i} _tok_{11 + 7 * i}"]}
        for i, n in enumerate(names)]}


def extract_rows(paths: dict, tmp: Path, env: dict, rank: int, skip_mergekit: bool) -> list[dict]:
    py = sys.executable
    common = [str(paths["ft-a"]), "--base", str(paths["base"]), "--max-rank", str(rank), "--device", "cpu", "--quiet"]
    rows = []
    if not skip_mergekit:
        mk = [str(Path(py).parent / "mergekit-extract-lora"), "--model", str(paths["ft-a"]), "--base-model",
              str(paths["base"]), "--out-path", str(tmp / "mk-lora"), "--max-rank", str(rank)]
        rows.append({"tool": "mergekit-extract-lora", **measure(mk, env)})
    for svd in ("exact", "auto", "lowrank"):
        cmd = [py, "-m", "weightsmith", "extract-lora", *common, "-o", str(tmp / f"ws-lora-{svd}"), "--svd", svd]
        row = {"tool": f"weightsmith extract-lora --svd {svd}", **measure(cmd, env)}
        if not skip_mergekit:
            row.update(compare_adapters(tmp / f"ws-lora-{svd}", tmp / "mk-lora", paths))
        rows.append(row)
    return rows


def moe_rows(paths: dict, tmp: Path, env: dict, skip_mergekit: bool) -> list[dict]:
    py = sys.executable
    rows = []
    for mode in ("random", "hidden"):
        (tmp / f"{mode}.yml").write_text(json.dumps(moe_config(paths, mode)))
        if not skip_mergekit:
            mk = [str(Path(py).parent / "mergekit-moe"), str(tmp / f"{mode}.yml"), str(tmp / f"mk-{mode}"),
                  "--device", "cpu"]
            rows.append({"tool": f"mergekit-moe ({mode})", **measure(mk, env)})
        ws = [py, "-m", "weightsmith", "moe", str(tmp / f"{mode}.yml"), str(tmp / f"ws-{mode}"), "--device", "cpu",
              "--quiet"]
        row = {"tool": f"weightsmith moe ({mode})", **measure(ws, env)}
        if not skip_mergekit and mode == "hidden":  # random gates differ between two unseeded processes
            row["bit_equal"] = same_tensors(tmp / f"ws-{mode}", tmp / f"mk-{mode}")
        rows.append(row)
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--params", default="100M", help="model size, e.g. 100M or 30M (default: 100M)")
    ap.add_argument("--rank", type=int, default=32, help="--max-rank of both extractions (default: 32)")
    ap.add_argument("--skip-mergekit", action="store_true")
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()
    params = int(float(args.params.rstrip("MmBb")) * (1e9 if args.params[-1] in "Bb" else 1e6))
    paths = build_models(params, "2GB")
    if not (paths["base"] / "tokenizer.json").exists():  # mergekit-moe reads the base's tokenizer in every mode
        _tokenizer(paths["base"], Checkpoint(paths["base"]).config["vocab_size"], [])
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    with tempfile.TemporaryDirectory(prefix="tools-bench-", dir=cache_root()) as tmp:
        tmp = Path(tmp)
        rows = extract_rows(paths, tmp, env, args.rank, args.skip_mergekit) + moe_rows(paths, tmp, env,
                                                                                        args.skip_mergekit)
    n = Checkpoint(paths["base"]).num_params
    if args.json:
        print(json.dumps({"params": n, "rows": rows}, indent=2))
        return
    print(f"inputs: Llama of {n / 1e6:.0f}M parameters (float32); extract-lora --max-rank {args.rank}; "
          f"moe: 4 experts; {torch.get_num_threads()} threads")
    print(f"{'tool':<40} {'wall s':>8} {'peak RSS MB':>12}  check")
    for r in rows:
        check = (f"max |ΔBA|/max|BA| {r['max_rel_gap_BA']:.1e}, residual / mergekit's {r['residual_ratio']:.4f}"
                 if "max_rel_gap_BA" in r
                 else f"bit-equal: {r['bit_equal']}" if "bit_equal" in r else "")
        print(f"{r['tool']:<40} {r['wall_s']:>8.1f} {r['rss_mb']:>12.0f}  {check}")


if __name__ == "__main__":
    main()
