"""``make demo``: build (or reuse) the zoo and run real weightsmith commands on it, printing each one.

Every command is run exactly as a user would type it, so the transcript doubles as a tutorial.
Outputs go to ./demo-out (replaced on each run).
"""
from __future__ import annotations

import argparse
import os
import shlex
import shutil
import subprocess
import sys
import time
from pathlib import Path


def sh(args: list[str]) -> str:
    cmd = ["weightsmith", *map(str, args)]
    print(f"\n$ {shlex.join(cmd)}", flush=True)
    start = time.time()
    proc = subprocess.run([sys.executable, "-m", "weightsmith", *map(str, args)], text=True, stdout=subprocess.PIPE,
                          env={**os.environ, "COLUMNS": os.environ.get("COLUMNS", "110")})
    sys.stdout.write(proc.stdout)
    print(f"  ({time.time() - start:.1f} s)", flush=True)
    if proc.returncode != 0:
        sys.exit(proc.returncode)
    return proc.stdout


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--size", default="tiny", help="zoo size (default tiny)")
    ap.add_argument("--out", default="demo-out", help="output folder (default demo-out)")
    args = ap.parse_args()
    out = Path(args.out)
    if out.is_symlink() or out.exists() and (not out.is_dir() or {p.name for p in out.iterdir()} - {"pipeline"}):
        sys.exit(f"error: {out} exists and is not an earlier demo's output; remove it or choose another --out")
    shutil.rmtree(out, ignore_errors=True)
    out.mkdir(parents=True)
    print("weightsmith demo: the in-house zoo is trained on Python's own source and docs (cached after the first run).")
    sh(["zoo", "build", "--size", args.size])
    path = sh(["zoo", "path", "--size", args.size]).strip()
    models = Path(path) / "models"
    sh(["inspect", models / "base"])
    pipeline = Path(__file__).resolve().parents[1] / "examples" / "demo.yaml"
    if not pipeline.exists():
        sys.exit(f"error: {pipeline} not found; run the demo from a clone of the repository")
    sh(["run", pipeline, "--workdir", out / "pipeline", "--device", "cpu"])
    report = out / "pipeline" / "report.md"
    print(f"\nreport: {report}\nplots:  {out / 'pipeline' / 'perplexity_vs_size.png'}, "
          f"{out / 'pipeline' / 'layers' / 'heatmap.png'}")
    print("\ndemo finished; outputs are under", out.resolve())


if __name__ == "__main__":
    main()
