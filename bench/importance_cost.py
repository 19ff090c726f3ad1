"""Cost of each fold importance on all-MiniLM-L6-v2 against ShortGPT BI on the same calibration tokens
(target: the default `loss` importance <= 3x BI), for one and two blocks removed.

    .venv/bin/python bench/importance_cost.py [--max-tokens 16384] [--seq 128] [--repeats 3] [--threads 1]

Reports the best of --repeats for wall seconds and for this process's CPU seconds (with one thread the
CPU seconds hardly move when other jobs share the machine; read those ratios on a loaded machine).
"""
from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import torch

import weightsmith
from weightsmith.eval import load_tokenizer
from weightsmith.data import calibration_windows
from weightsmith.fold.english import write_calibration
from weightsmith.pooling import read_pooling
from weightsmith.fold.stage import choose_removed
from weightsmith.zoo import minilm_path


def timed(fn, repeats: int) -> tuple[float, float, object]:
    walls, cpus = [], []
    for _ in range(repeats):
        w, c = time.perf_counter(), time.process_time()
        out = fn()
        walls.append(time.perf_counter() - w)
        cpus.append(time.process_time() - c)
    return min(walls), min(cpus), out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--max-tokens", type=int, default=16384)
    ap.add_argument("--seq", type=int, default=128)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    path = minilm_path()
    model, pooling = weightsmith.load(path), read_pooling(path)
    with tempfile.TemporaryDirectory() as tmp:
        data = write_calibration(Path(tmp) / "calib.txt")
        windows = calibration_windows(load_tokenizer(path), data, seq_len=args.seq, max_tokens=args.max_tokens, causal=False)
    print(f"all-MiniLM-L6-v2, {windows.numel()} calibration tokens in windows of {args.seq}, "
          f"{args.threads} thread(s), best of {args.repeats}")
    print("| blocks removed | importance | chosen | wall s | CPU s | wall x BI | CPU x BI |")
    print("|---|---|---|---|---|---|---|")
    for k in (1, 2):
        rows = {}
        for importance in ("bi", "angular", "loss"):
            rows[importance] = timed(lambda: choose_removed(model, windows, k, importance, gate_steps=1, batch_size=8,
                                                            seed=0, device="cpu", progress=None, pooling=pooling),
                                     args.repeats)
        bi_wall, bi_cpu = rows["bi"][:2]
        for importance, (wall, cpu, (chosen, _)) in rows.items():
            print(f"| {k} | {importance} | {chosen} | {wall:.1f} | {cpu:.1f} | {wall / bi_wall:.2f} | "
                  f"{cpu / bi_cpu:.2f} |", flush=True)


if __name__ == "__main__":
    main()
