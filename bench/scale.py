"""Every stage on a ~1B-parameter bfloat16 Llama: wall and peak RSS of each command, as a multiple of the model's bytes.

The model has TinyLlama's shape (22 layers, hidden 2048, intermediate 5632, 32 heads / 4 KV heads) with a
1024-token vocabulary and random weights; it is built once under --work, tensor by tensor, with a second
model (another seed) for align/PLeaS and three perturbed copies for a TIES merge. Each stage runs as its
own `python -m weightsmith ...` process under /usr/bin/time, which gives its peak RSS.

    python bench/scale.py --work /tmp/scale                       # every stage on the 1B model
    python bench/scale.py --work /tmp/scale --params 100M --only compress,align   # a quick check
    python bench/scale.py --params 7B --plan                       # shapes and bytes only, nothing built

STAGES (name -> command builder) is the table to extend with more rows.
"""
from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from merge_vs_mergekit import llama_shapes  # noqa: E402
from weightsmith.checkpoint import Checkpoint, ShardedWriter, write_config  # noqa: E402

SHAPES = {  # hidden, intermediate, layers, heads, kv heads
    "1B": (2048, 5632, 22, 32, 4),    # TinyLlama-1.1B's blocks
    "100M": (768, 2048, 12, 12, 4),
    "20M": (256, 704, 8, 8, 4),
    "7B": (4096, 11008, 32, 32, 32),  # Llama-2-7B's blocks (plans only)
}
VOCAB = 1024
FINETUNES = ("ft1", "ft2", "ft3")


def llama_config(shape: str) -> dict:
    h, i, n, heads, kv = SHAPES[shape]
    return {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": h, "intermediate_size": i,
            "num_hidden_layers": n, "num_attention_heads": heads, "num_key_value_heads": kv, "vocab_size": VOCAB,
            "max_position_embeddings": 2048, "rms_norm_eps": 1e-5, "tie_word_embeddings": False,
            "hidden_act": "silu", "dtype": "bfloat16", "bos_token_id": 0, "eos_token_id": 0}


def model_bytes(cfg: dict) -> int:
    return sum(torch.Size(s).numel() * 2 for _, s in llama_shapes(cfg))


def write_model(folder: Path, cfg: dict, seed: int, tokenizer: Path, noise_of: Path | None = None,
                noise: float = 0.0) -> None:
    """One tensor at a time: N(0, 0.02) weights (or ``noise_of``'s plus N(0, noise)), unit norms, bf16."""
    tmp = folder.with_name(folder.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    shapes = llama_shapes(cfg)
    writer = ShardedWriter(tmp, [(k, torch.bfloat16, s) for k, s in shapes], "2GB")
    src = Checkpoint(noise_of) if noise_of is not None else None
    for idx, (k, s) in enumerate(shapes):
        g = torch.Generator().manual_seed(seed * 100_003 + idx)
        if src is not None:
            t = src.read(k, dtype=torch.float32) + (0 if k.endswith("norm.weight") else torch.randn(s, generator=g) * noise)
        else:
            t = torch.ones(s) if k.endswith("norm.weight") else torch.randn(s, generator=g) * 0.02
        writer.write(k, t.to(torch.bfloat16))
        del t
    writer.close()
    write_config(tmp, cfg)
    for f in tokenizer.iterdir():
        shutil.copy(f, tmp / f.name)
    tmp.rename(folder)


def prepare(work: Path, shape: str, need: set[str]) -> dict[str, Path]:
    """Cached inputs: tokenizer, calibration text, model A (always), B and the fine-tunes when asked for."""
    from weightsmith.zoo import corpus
    from weightsmith.zoo.build import train_tokenizer

    root = work / shape
    tok, calib = work / "tokenizer", work / "calib.txt"
    if not (tok / "tokenizer.json").exists():
        train_tokenizer(tok, VOCAB, 200_000)
    if not calib.exists():
        calib.write_text(corpus.split_text(corpus.GENERAL, "valid", 60_000))
    cfg = llama_config(shape)
    paths = {"tokenizer": tok, "calib": calib, "A": root / "A", "B": root / "B",
             **{n: root / n for n in FINETUNES}}
    for name in ("A", "B", *FINETUNES):
        if (name == "A" or name in need) and not (paths[name] / "config.json").exists():
            print(f"building {paths[name]} ...", file=sys.stderr, flush=True)
            if name in FINETUNES:
                write_model(paths[name], cfg, FINETUNES.index(name) + 2, tok, paths["A"], 0.002)
            else:
                write_model(paths[name], cfg, 0 if name == "A" else 1, tok)
    return paths


def ws(*args: str) -> list[str]:
    return [sys.executable, "-m", "weightsmith", *args]


def mergekit_recipe(p: dict, out: Path) -> Path:
    recipe = {"merge_method": "ties", "base_model": str(p["A"]), "dtype": "bfloat16",
              "parameters": {"normalize": True, "int8_mask": False},
              "models": [{"model": str(p[n]), "parameters": {"weight": 1.0, "density": 0.5}} for n in FINETUNES]}
    out.mkdir(parents=True, exist_ok=True)
    (out / "ties.yaml").write_text(json.dumps(recipe))
    return out / "ties.yaml"


@dataclass
class Stage:
    needs: tuple[str, ...]  # inputs beyond model A (and earlier stages' outputs, by stage name)
    command: object  # (paths, out folder) -> argv
    optional: bool = False  # run only when named in --only or --mergekit
    bound: float | None = None  # peak RSS allowed, in model bytes


Q = ("--quiet", "--force")
FOLD_TOKENS = ("--max-tokens", "2048")  # the importance's time grows with the calibration tokens, its memory does not
STAGES: dict[str, Stage] = {
    "inspect": Stage((), lambda p, o: ws("inspect", str(p["A"]))),
    "merge ties base+3": Stage(FINETUNES, lambda p, o: ws(
        "merge", "--method", "ties", "--base", str(p["A"]), *[a for n in FINETUNES for a in ("--model", str(p[n]))],
        "--density", "0.5", "--out", str(o), *Q)),
    "mergekit-yaml ties": Stage(FINETUNES, lambda p, o: [
        str(Path(sys.executable).parent / "mergekit-yaml"), str(mergekit_recipe(p, o.with_name("mk-recipe"))), str(o),
        "--no-copy-tokenizer"], optional=True),
    "eval": Stage((), lambda p, o: ws("eval", str(p["A"]), "--data", str(p["calib"]), "--max-tokens", "2048",
                                      "--context", "512", "--quiet"), bound=1.3),
    "eval batch 1": Stage((), lambda p, o: ws("eval", str(p["A"]), "--data", str(p["calib"]), "--max-tokens", "2048",
                                             "--context", "512", "--batch-size", "1", "--quiet"), optional=True, bound=1.3),
    "analyze": Stage((), lambda p, o: ws("analyze", str(p["A"]), "--data", str(p["calib"]), "--max-tokens", "2048",
                                         "--quiet"), bound=1.3),
    "fold bi, no heal": Stage((), lambda p, o: ws(
        "fold", str(p["A"]), "--data", str(p["calib"]), "--importance", "bi", "--remove", "0.1", "--heal-steps", "0",
        *FOLD_TOKENS, "--out", str(o), *Q), bound=1.3),
    "fold angular, no heal": Stage((), lambda p, o: ws(
        "fold", str(p["A"]), "--data", str(p["calib"]), "--importance", "angular", "--remove", "0.1",
        "--heal-steps", "0", *FOLD_TOKENS, "--out", str(o), *Q), bound=1.3),
    "fold loss, no heal": Stage((), lambda p, o: ws(
        "fold", str(p["A"]), "--data", str(p["calib"]), "--remove", "0.1", "--heal-steps", "0", *FOLD_TOKENS,
        "--out", str(o), *Q), bound=1.3),
    "fold bi + 2 LoRA heal": Stage((), lambda p, o: ws(
        "fold", str(p["A"]), "--data", str(p["calib"]), "--importance", "bi", "--remove", "0.1", "--heal-steps", "2",
        "--heal-lora", "8", "--batch-size", "2", *FOLD_TOKENS, "--out", str(o), *Q), bound=1.5),
    "fold bi + 2 LoRA heal recompute": Stage((), lambda p, o: ws(
        "fold", str(p["A"]), "--data", str(p["calib"]), "--importance", "bi", "--remove", "0.1", "--heal-steps", "2",
        "--heal-lora", "8", "--heal-recompute", "--batch-size", "2", *FOLD_TOKENS, "--out", str(o), *Q), bound=1.5),
    "fold bi + 2 heal adafactor": Stage((), lambda p, o: ws(
        "fold", str(p["A"]), "--data", str(p["calib"]), "--importance", "bi", "--remove", "0.1", "--heal-steps", "2",
        "--heal-optimizer", "adafactor", "--batch-size", "2", *FOLD_TOKENS, "--out", str(o), *Q), bound=4.0),
    "fold bi + 2 heal": Stage((), lambda p, o: ws(
        "fold", str(p["A"]), "--data", str(p["calib"]), "--importance", "bi", "--remove", "0.1", "--heal-steps", "2",
        "--batch-size", "2", *FOLD_TOKENS, "--out", str(o), *Q), bound=4.0),
    "fold bi + 2 heal, teacher cache": Stage((), lambda p, o: ws(
        "fold", str(p["A"]), "--data", str(p["calib"]), "--importance", "bi", "--remove", "0.1", "--heal-steps", "2",
        "--batch-size", "2", "--teacher-cache", *FOLD_TOKENS, "--out", str(o), *Q), bound=4.0),
    "fold bi + 2 FSDP heal, 2 ranks": Stage((), lambda p, o: [
        sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "-m", "weightsmith", "fold", str(p["A"]),
        "--data", str(p["calib"]), "--importance", "bi", "--remove", "0.1", "--heal-steps", "2", "--batch-size", "2",
        "--device", "cpu", "--fsdp", *FOLD_TOKENS, "--json", "--out", str(o), "--force"]),
    "compress rps 0.5": Stage((), lambda p, o: ws("compress", "rps", str(p["A"]), "--budget", "0.5", "--out", str(o),
                                                  *Q), bound=1.3),
    "export rps --plain": Stage(("compress rps 0.5",), lambda p, o: ws(
        "export", str(p["compress rps 0.5"]), "--plain", "--out", str(o), *Q)),
    "align weight": Stage(("B",), lambda p, o: ws("align", str(p["A"]), str(p["B"]), "--method", "weight",
                                                   "--max-sweeps", "3", "--out", str(o), *Q), bound=2.5),
    "pleas 1.2": Stage(("B",), lambda p, o: ws(
        "pleas", str(p["A"]), str(p["B"]), "--width", "1.2", "--data", str(p["calib"]), "--max-tokens", "1024",
        "--out", str(o), *Q), bound=3.0),
}


def _rss_kb(pid: int) -> int | None:
    try:
        text = Path(f"/proc/{pid}/status").read_text()
    except OSError:
        return None
    return next((int(line.split()[1]) for line in text.splitlines() if line.startswith("VmRSS")), 0)


def _watch(timer: int, cap_kb: int, killed: list) -> None:
    """Kill the stage (the child of /usr/bin/time) when its RSS passes ``cap_kb``: a run that would exhaust
    a shared machine."""
    children = Path(f"/proc/{timer}/task/{timer}/children")
    while True:
        try:
            pids = [int(p) for p in children.read_text().split()]
        except OSError:
            return
        for pid in pids:
            if (_rss_kb(pid) or 0) > cap_kb:
                killed.append(pid)
                os.kill(pid, 9)
                return
        time.sleep(0.1)


def measure(argv: list[str], cap_gb: float, code: Path) -> dict:
    """Wall seconds, peak RSS (bytes, from /usr/bin/time: a forked child's own ru_maxrss would start at the
    parent's size) and exit code of one stage."""
    env = {**os.environ, "PYTHONPATH": str(code)}
    log = Path(tempfile.mkstemp(suffix=".time")[1])
    start = time.perf_counter()
    # run from the checkout itself: `python -m` puts the working directory first on the path
    out = tempfile.TemporaryFile("w+")
    proc = subprocess.Popen(["/usr/bin/time", "-v", "-o", str(log), *argv], env=env, cwd=code,
                            stdout=out, stderr=subprocess.PIPE, text=True)
    killed: list = []
    threading.Thread(target=_watch, args=(proc.pid, int(cap_gb * 2**20), killed), daemon=True).start()
    err = proc.stderr.read()
    proc.wait()
    out.seek(0)
    ranks = _rank_figures(out.read())
    text = log.read_text()
    log.unlink()
    peak = int(re.search(r"Maximum resident set size \(kbytes\): (\d+)", text).group(1)) * 1024
    row = {"wall_s": time.perf_counter() - start, "peak_rss": peak, "rc": proc.returncode, **ranks}
    if killed:
        row["killed_above_gb"] = cap_gb
    elif proc.returncode:
        row["error"] = err.strip().splitlines()[-1:] or ["?"]
    return row


def _rank_figures(stdout: str) -> dict:
    """Each rank's peak RSS and heal tensor bytes, from a fold's JSON report (a sharded heal reports them)."""
    try:
        ranks = json.loads(stdout).get("heal_ranks") or []
    except (ValueError, AttributeError):
        return {}
    return {"ranks": [{"rank": r["rank"], **r["held"]} for r in ranks if "held" in r]} if len(ranks) > 1 else {}


def _folder(stage: str) -> str:
    return stage.split()[0].replace("-", "_")


def chosen(args) -> list[str]:
    only = [s.strip() for s in args.only.split(",")] if args.only else None
    names = []
    for name, stage in STAGES.items():
        hit = only is None or any(name.startswith(o) for o in only)
        if hit and (not stage.optional or args.mergekit or (only and any(name.startswith(o) for o in only))):
            names.append(name)
    return names


def _bound(name: str, model_b: int) -> str:
    bound = STAGES[name].bound
    return f"<= {bound:.1f} B ({bound * model_b / 1e9:.1f} GB)" if bound else "streaming"


def plan(model_b: int) -> None:
    """Each stage's memory bound for this shape."""
    for name in STAGES:
        print(f"{name:24} {_bound(name, model_b)}")


def show(rows: dict, model_b: int) -> None:
    print(f"{'stage':24} {'wall':>9} {'peak RSS':>10} {'x B':>6}  bound")
    for name, r in rows.items():
        note = f"  killed above {r['killed_above_gb']} GB" if "killed_above_gb" in r else (
            f"  failed: {r['error'][0][:80]}" if "error" in r else "")
        print(f"{name:24} {r['wall_s']:8.1f}s {r['peak_rss'] / 1e9:8.2f}GB {r['peak_rss'] / model_b:6.2f}  "
              f"{_bound(name, model_b)}{note}")
        for rank in r.get("ranks", []):
            held = rank["params"] + rank["grads"] + rank["optimizer"]
            print(f"  rank {rank['rank']}: peak RSS {rank['peak_rss'] / 1e9:.2f}GB = {rank['peak_rss'] / model_b:.2f} B; "
                  f"params+grads+optimizer {held / 1e9:.2f}GB = {held / model_b:.2f} B")
    if "merge ties base+3" in rows and "mergekit-yaml ties" in rows:
        a, b = rows["merge ties base+3"], rows["mergekit-yaml ties"]
        print(f"merge vs mergekit-yaml: wall x{a['wall_s'] / b['wall_s']:.2f}, peak RSS "
              f"x{a['peak_rss'] / b['peak_rss']:.2f}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--work", type=Path, default=Path("/tmp/weightsmith-scale"), help="cache of models and outputs")
    ap.add_argument("--params", default="1B", choices=list(SHAPES), help="model shape")
    ap.add_argument("--only", help="comma-separated stage name prefixes (e.g. 'compress,align')")
    ap.add_argument("--mergekit", action="store_true", help="also run mergekit-yaml on the merge inputs (slow)")
    ap.add_argument("--cap-gb", type=float, default=20.0, help="kill a stage whose RSS passes this")
    ap.add_argument("--code", type=Path, default=Path(__file__).resolve().parents[1],
                    help="the weightsmith checkout whose stages run (default: this one; another gives a before/after)")
    ap.add_argument("--plan", action="store_true", help="print the shape, its bytes and each stage's bound only")
    ap.add_argument("--json", action="store_true", help="print the rows as JSON")
    args = ap.parse_args()
    cfg = llama_config(args.params)
    b = model_bytes(cfg)
    params = b // 2
    print(f"{args.params}: {params / 1e9:.3f}B parameters, B = {b / 1e9:.2f} GB in bf16; "
          f"torch {torch.__version__}, {os.cpu_count()} CPUs", file=sys.stderr)
    if args.plan:
        plan(b)
        return
    names = chosen(args)
    need = {n for name in names for n in STAGES[name].needs}
    paths: dict = prepare(args.work, args.params, need)
    outs = args.work / args.params / "out"
    for name in STAGES:  # outputs an earlier run left serve the stages that read them
        if (outs / _folder(name) / "config.json").exists():
            paths[name] = outs / _folder(name)
    rows = {}
    for name in names:
        stage = STAGES[name]
        out = outs / _folder(name)
        missing = [n for n in stage.needs if n in STAGES and n not in paths]
        if missing:
            print(f"{name}: skipped (needs the {missing[0]!r} stage)", file=sys.stderr)
            continue
        shutil.rmtree(out, ignore_errors=True)
        rows[name] = measure(stage.command(paths, out), args.cap_gb, args.code.resolve())
        print(f"{name}: {rows[name]}", file=sys.stderr, flush=True)
        if out.exists():
            paths[name] = out
    if args.json:
        print(json.dumps({"shape": args.params, "model_bytes": b, "rows": rows}, indent=2))
    else:
        show(rows, b)


if __name__ == "__main__":
    main()
