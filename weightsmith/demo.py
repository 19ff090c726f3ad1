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
    proc = subprocess.run([sys.executable, "-m", "weightsmith", *map(str, args)], text=True, stdout=subprocess.PIPE)
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
    shutil.rmtree(out, ignore_errors=True)
    out.mkdir(parents=True)
    print("weightsmith demo: the in-house zoo is trained on Python's own source and docs (cached after the first run).")
    sh(["zoo", "build", "--size", args.size])
    path = sh(["zoo", "path", "--size", args.size]).strip()
    models, data = Path(path) / "models", Path(path) / "data"
    sh(["inspect", models / "base"])
    sh(["eval", models / "base", models / "ft-prose", models / "ft-asyncio", models / "ft-email",
        "--data", data / "prose.valid.txt", "--max-tokens", "4000", "--device", "cpu"])
    print("\ndemo finished; outputs are under", out.resolve())


if __name__ == "__main__":
    main()
