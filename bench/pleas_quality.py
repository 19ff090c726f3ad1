"""PLeaS quality on classifiers trained on disjoint label halves of scikit-learn's bundled digits (no download).

Model A learns labels 0-4, model B labels 5-9 (different seeds, 10-way heads); joint accuracy on all ten
classes of: each model, plain average, weight matching + average, activation matching + average, a ZipIt!-style
partial zip (first half of the groups merged, the rest kept separate, no refit), PLeaS at several widths, and the
2× ensemble (mean of both models' logits). Calibration data: the unlabelled training images of both halves.
Also, with --lm, per-domain perplexity of LM merges on the tiny zoo (ft-prose vs b-ft-email, different bases).

    .venv/bin/python bench/pleas_quality.py [--arch mlp resnet] [--seeds 3] [--lm]
"""
from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests" / "align"))
from models import ResNet, mlp  # noqa: E402

from weightsmith.merge.align import activation_similarity, assign, identity_perms, spec_for, weight_matching  # noqa: E402
from weightsmith.merge.pleas import pleas_modules  # noqa: E402

WIDTHS = (1.0, 1.2, 1.5, 2.0)


def digits(seed: int = 0):
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    d = load_digits()
    x = torch.tensor(d.images / 16.0, dtype=torch.float32)
    y = torch.tensor(d.target)
    xtr, xte, ytr, yte = train_test_split(x, y, test_size=0.3, random_state=seed, stratify=y)
    return xtr, xte, ytr, yte


def make(arch: str, seed: int) -> nn.Module:
    return mlp((64, 256, 256, 10), seed=seed) if arch == "mlp" else ResNet(width=8, classes=10, seed=seed)


def view(arch: str, x: torch.Tensor) -> torch.Tensor:
    return x.reshape(len(x), 64) if arch == "mlp" else x.reshape(len(x), 1, 8, 8)


def train(arch: str, x, y, seed: int, epochs: int) -> nn.Module:
    model = make(arch, seed)
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)  # 3e-3 left a third of the ResNets at ~0.77 on their own half
    gen = torch.Generator().manual_seed(seed)
    model.train()
    for _ in range(epochs):
        for idx in torch.randperm(len(x), generator=gen).split(32):
            opt.zero_grad()
            nn.functional.cross_entropy(model(view(arch, x[idx])), y[idx]).backward()
            opt.step()
    return model.eval()


@torch.no_grad()
def acc(model_or_logits, x, y, arch) -> float:
    logits = model_or_logits(view(arch, x)) if callable(model_or_logits) else model_or_logits
    return float((logits.argmax(-1) == y).float().mean())


def classifier_run(arch: str, seed: int, epochs: int, widths=WIDTHS) -> dict:
    xtr, xte, ytr, yte = digits(seed)
    half_a, half_b = ytr < 5, ytr >= 5
    a = train(arch, xtr[half_a], ytr[half_a], 2 * seed, epochs)
    b = train(arch, xtr[half_b], ytr[half_b], 2 * seed + 1, epochs)
    calib = list(view(arch, xtr).split(256))
    spec = spec_for(a)
    row: dict[str, float] = {
        "A own half": acc(a, xte[yte < 5], yte[yte < 5], arch), "B own half": acc(b, xte[yte >= 5], yte[yte >= 5], arch),
        "A joint": acc(a, xte, yte, arch), "B joint": acc(b, xte, yte, arch)}
    with torch.no_grad():
        row["ensemble 2x"] = acc((a(view(arch, xte)) + b(view(arch, xte))) / 2, xte, yte, arch)
    times: dict[str, float] = {}
    t0 = time.perf_counter()
    sim = activation_similarity(a, b, spec, calib)
    times["activation statistics"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    am = assign(sim)
    times["activation matching (assignment)"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    wm = weight_matching(spec, a.state_dict(), b.state_dict())
    times["weight matching"] = time.perf_counter() - t0
    for label, perms in (("plain average", identity_perms(spec)), ("weight matching + avg", wm),
                         ("activation matching + avg", am)):
        merged, _ = pleas_modules(a, b, calib, width=1.0, perms=perms, similarity=sim, least_squares=False, spec=spec)
        row[label] = acc(merged, xte, yte, arch)
    groups = list(spec.groups)
    zip_counts = {g: (spec.groups[g].size if i < len(groups) // 2 else 0) for i, g in enumerate(groups)}
    zipped, rep = pleas_modules(a, b, calib, perms=am, similarity=sim, least_squares=False, spec=spec, counts=zip_counts)
    row[f"ZipIt!-style partial zip ({rep['size_vs_a']:.2f}x params)"] = acc(zipped, xte, yte, arch)
    for w in widths:
        merged, rep = pleas_modules(a, b, calib, width=w, perms=am, similarity=sim, spec=spec)
        row[f"PLeaS {w}x"] = acc(merged, xte, yte, arch)
        times[f"least squares statistics ({w}x)"] = rep["least_squares_statistics_s"]
        times[f"least squares solve ({w}x)"] = rep["least_squares_solve_s"]
    return {"accuracy": row, "seconds": times}


def lm_run(max_tokens: int, widths=(1.0, 1.2, 1.5)) -> dict:
    from weightsmith.eval import evaluate_model
    from weightsmith.merge.align.folders import align
    from weightsmith.merge.pleas_stage import pleas_merge
    from weightsmith.zoo import build

    zoo = build("tiny")
    a, b = zoo.model("ft-prose"), zoo.model("b-ft-email")
    calib = zoo.data("general", "calib")
    rows: dict[str, dict] = {}
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        align(a, b, tmp / "b-aligned", method="weight", device="cpu")
        models = {"ft-prose (A)": a, "b-ft-email (B)": b}
        for label, bb in (("average", b), ("re-basin + average", tmp / "b-aligned")):
            out = tmp / label.replace(" ", "")
            merged, _ = _average_folders(a, bb, out)
            models[label] = out
        for w in widths:
            out = tmp / f"pleas{w}"
            rep = pleas_merge(a, b, data=calib, width=w, out=out, max_tokens=max_tokens, device="cpu")
            models[f"PLeaS {w}x"] = out
            rows.setdefault("_seconds", {})[f"{w}x"] = {k: v for k, v in rep.items() if k.endswith("_s")}
        for label, path in models.items():
            rows[label] = {d: round(evaluate_model(path, data=zoo.data(d, "valid"), max_tokens=2000,
                                                   device="cpu").perplexity, 2) for d in ("prose", "email")}
    return rows


def _average_folders(a, b, out):
    from weightsmith.merge.align.folders import load_pair, save_like
    from weightsmith.checkpoint import Checkpoint

    ma, mb = load_pair(a, b, "cpu")
    sb = mb.state_dict()
    ma.load_state_dict({k: (v + sb[k]) / 2 for k, v in ma.state_dict().items()})
    out.mkdir(parents=True)
    save_like(ma, a, out, Checkpoint(a).config, "5GB")
    return ma, out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--arch", nargs="+", default=["mlp", "resnet"], choices=["mlp", "resnet"])
    ap.add_argument("--seeds", type=int, default=3)
    ap.add_argument("--epochs", type=int, default=30)
    ap.add_argument("--lm", action="store_true", help="also the tiny-zoo LM merge (perplexity per domain)")
    ap.add_argument("--lm-tokens", type=int, default=8192)
    args = ap.parse_args()
    torch.set_num_threads(max(1, torch.get_num_threads()))
    for arch in args.arch:
        runs = [classifier_run(arch, s, args.epochs) for s in range(args.seeds)]
        print(f"\n## {arch}: joint accuracy on digits 0-9 (A: labels 0-4, B: 5-9), mean ± sd over {args.seeds} seeds\n")
        print("| method | joint accuracy |\n|---|---|")
        for key in runs[0]["accuracy"]:
            v = np.array([r["accuracy"][key] for r in runs])
            print(f"| {key} | {v.mean():.3f} ± {v.std():.3f} |")
        print("\nseconds per stage (CPU, mean):")
        for key in runs[0]["seconds"]:
            print(f"  {key}: {np.mean([r['seconds'][key] for r in runs]):.3f}")
    if args.lm:
        rows = lm_run(args.lm_tokens)
        secs = rows.pop("_seconds")
        print("\n## tiny zoo LMs: ft-prose (base) + b-ft-email (base-b), perplexity (first 2000 valid tokens)\n")
        print("| model | prose | email |\n|---|---|---|")
        for label, r in rows.items():
            print(f"| {label} | {r['prose']} | {r['email']} |")
        print("\nPLeaS seconds per stage (CPU):", secs)


if __name__ == "__main__":
    main()
