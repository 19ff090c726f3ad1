"""mergekit's own examples/*.yml, as they are (their original Hub names), through ``weightsmith merge --compat
mergekit`` against a loopback Hub that serves tiny stand-ins under those names (the real huggingface_hub client
fills a temporary Hugging Face cache), again with ``HF_HUB_OFFLINE=1`` from that cache, and through mergekit-yaml
0.1.5 on the same cache and Hub; one row per example:

    .venv/bin/python bench/hub_examples.py [--work DIR] [--examples DIR]

--examples is a folder of mergekit's examples (default: mergekit's git snapshot under /work/.mirror, read with
git). Nothing leaves the machine: the Hub is 127.0.0.1.
"""
from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT / "bench"), str(ROOT / "tests")]

from fake_hub import FakeHub  # noqa: E402
from mergekit_configs import EXAMPLE_NAMES, MIRROR, build_models, compare  # noqa: E402


def examples(folder: Path | None) -> dict[str, str]:
    if folder is not None:
        return {p.stem: p.read_text() for p in sorted(folder.glob("*.yml"))}
    git = ["git", "-C", str(MIRROR)]
    names = subprocess.run(git + ["ls-tree", "--name-only", "HEAD", "examples/"], capture_output=True, text=True,
                           check=True).stdout.split()
    return {Path(n).stem: subprocess.run(git + ["show", f"HEAD:{n}"], capture_output=True, text=True,
                                         check=True).stdout for n in names if n.endswith(".yml")}


def run(cmd: list[str], env: dict) -> tuple[int, str, float]:
    start = time.perf_counter()
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=1800)
    err = next((line for line in proc.stderr.splitlines()[::-1] if line.strip()), "")
    return proc.returncode, err[:160], time.perf_counter() - start


def same(a: Path, b: Path) -> bool:
    from weightsmith.checkpoint import Checkpoint

    ca, cb = Checkpoint(a), Checkpoint(b)
    import torch
    return sorted(ca.names()) == sorted(cb.names()) and all(torch.equal(ca.get(n), cb.get(n)) for n in ca.names())


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--work", type=Path, default=None)
    ap.add_argument("--examples", type=Path, default=None, help="folder of mergekit example .yml files")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        work = args.work or Path(tmp)
        models = build_models(work / "models")
        texts = examples(args.examples)
        env = {k: v for k, v in os.environ.items() if k not in ("HF_HUB_OFFLINE", "WEIGHTSMITH_OFFLINE_BY_DEFAULT")}
        env.update({"HF_HOME": str(work / "hf-home"), "HF_HUB_DISABLE_XET": "1", "NO_PROXY": "127.0.0.1",
                    "WEIGHTSMITH_CACHE": str(work / "ws-cache")})
        rows = []
        with FakeHub(lifetime=3600) as hub:
            for hub_name, local in EXAMPLE_NAMES.items():
                hub.serve(hub_name, models[local])
            env["HF_ENDPOINT"] = hub.url
            for name, text in texts.items():
                recipe = work / "examples" / f"{name}.yml"
                recipe.parent.mkdir(parents=True, exist_ok=True)
                recipe.write_text(text)
                ws = [sys.executable, "-m", "weightsmith", "merge", str(recipe), "--compat", "mergekit", "-q", "--force"]
                on = run(ws + [str(work / "online" / name)], env)
                off = run(ws + [str(work / "offline" / name)], {**env, "HF_HUB_OFFLINE": "1"})
                mk = run([str(Path(sys.executable).parent / "mergekit-yaml"), str(recipe), str(work / "mk" / name)],
                         env)
                rows.append((name, on, off, mk))
        width = max(len(r[0]) for r in rows)
        print(f"{'example':<{width}}  online  offline  offline=online  vs mergekit-yaml (same cache)")
        for name, on, off, mk in rows:
            both = on[0] == 0 and off[0] == 0
            equal = same(work / "online" / name, work / "offline" / name) if both else False
            if on[0] == 0 and mk[0] == 0:
                inputs = [str(models[v]) for v in EXAMPLE_NAMES.values()]
                ok, detail = compare(work / "online" / name, work / "mk" / name, "", None, inputs)
                versus = ("bit-equal" if ok and detail.startswith("bit-equal") else detail)
            else:
                versus = f"weightsmith: {on[1]} | mergekit: {mk[1]}"
            print(f"{name:<{width}}  {'ok' if on[0] == 0 else 'FAIL':<6}  {'ok' if off[0] == 0 else 'FAIL':<7}  "
                  f"{str(equal):<14}  {versus}   ({on[2]:.1f} s / {mk[2]:.1f} s)")


if __name__ == "__main__":
    main()
