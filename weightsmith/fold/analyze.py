"""The analyze stage: one forward pass on calibration tokens, then per-block similarity metrics
(angular distance, ShortGPT Block Influence, linear CKA), a JSON report and a heatmap PNG.
"""
from __future__ import annotations

import json
import math
from pathlib import Path

import torch

from ..checkpoint.writer import check_output, output_folder
from ..device import resolve_device
from ..errors import WeightsmithError
from ..progress import ProgressFn, track
from ..stage_options import AnalyzeOptions
from .blocks import block_list, first_tensor, is_causal_lm
from ..data import calibration_windows
from .data import model_seq
from .similarity import RunningSimilarity, angular_drop, shortgpt_drop


@torch.no_grad()
def each_batch_states(model: torch.nn.Module, windows: torch.Tensor, on_state, *, batch_size: int = 8,
                      device: str | torch.device = "cpu", progress: ProgressFn | None = None) -> None:
    """``on_state(i, state, k)`` as each batch's forward pass reaches the input of block i (i = 0..k-2) and the
    last block's output (i = k-1): [batch, seq, hidden] in the model's dtype on its device; nothing is kept here.

    Hooks read the residual stream itself, so the last entry is before any final norm (unlike
    ``output_hidden_states`` on Llama, whose last entry is normed).
    """
    blocks = block_list(model)
    k = len(blocks) + 1

    def pre(i):
        def hook(mod, args, kwargs):
            on_state(i, (args[0] if args else kwargs["hidden_states"]).detach(), k)
        return hook

    def post(mod, args, kwargs, out):
        on_state(k - 1, first_tensor(out).detach(), k)

    handles = [b.register_forward_pre_hook(pre(i), with_kwargs=True) for i, b in enumerate(blocks)]
    handles.append(blocks[-1].register_forward_hook(post, with_kwargs=True))
    try:
        for s in track(progress, "forward", range(0, windows.shape[0], batch_size)):
            model(input_ids=windows[s:s + batch_size].to(device))
    finally:
        for h in handles:
            h.remove()


def block_states(model: torch.nn.Module, windows: torch.Tensor, *, batch_size: int = 8,
                 device: str | torch.device = "cpu", progress: ProgressFn | None = None) -> list[torch.Tensor]:
    """Every block input plus the last block's output over all ``windows``, [windows, seq, hidden] each, float32
    on the CPU (``each_batch_states``; the stages stream them instead, through ``block_similarity``)."""
    got: list[list[torch.Tensor]] = []

    def keep(i, state, k):
        if i == 0:
            got.append([])
        got[-1].append(state.float().cpu())

    each_batch_states(model, windows, keep, batch_size=batch_size, device=device, progress=progress)
    return [torch.cat(g) for g in zip(*got)]


def block_similarity(model: torch.nn.Module, windows: torch.Tensor, *, batch_size: int = 8,
                     device: str | torch.device = "cpu", progress: ProgressFn | None = None,
                     mean_angular: bool = True, cka: bool = True, cka_tokens: int | None = 1024) -> RunningSimilarity:
    """The similarity metrics of every block over ``windows``, accumulated as the forward passes go."""
    stats = RunningSimilarity(windows.numel(), mean_angular=mean_angular, cka=cka, cka_tokens=cka_tokens)
    each_batch_states(model, windows, stats.take, batch_size=batch_size, device=device, progress=progress)
    return stats


def similarity_report(stats: RunningSimilarity, remove: int) -> dict:
    bi = stats.block_influence()
    last = stats.angular_distance(last_token=True)
    mean = stats.angular_distance(last_token=False)
    cka = stats.cka_matrix()
    n = len(bi)

    def rows(m):
        return [[None if math.isnan(v) else round(v, 6) for v in r] for r in m.tolist()]

    return {
        "num_blocks": n,
        "block_influence": [round(v, 6) for v in bi.tolist()],
        "angular_distance_last_token": rows(last),
        "angular_distance_mean": rows(mean),
        "cka": rows(cka),
        "remove": remove,
        "shortgpt_drop": shortgpt_drop(bi, remove),
        "angular_drop": angular_drop(last, remove),
        "angular_drop_by_n": {str(k): {"blocks": angular_drop(last, k), "distance": round(float(last[angular_drop(last, k)[0], k - 1]), 6)}
                              for k in range(1, n)},
    }


def heatmap(report: dict, path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    n = report["num_blocks"]
    fig, axes = plt.subplots(1, 3, figsize=(15, 4.2))
    ang = np.array([[np.nan if v is None else v for v in r] for r in report["angular_distance_last_token"]])
    im = axes[0].imshow(ang.T, origin="lower", cmap="viridis_r", aspect="auto",
                        extent=(-0.5, n - 0.5, 0.5, n + 0.5))
    axes[0].set(xlabel="first block l", ylabel="span n", title="angular distance d(l, l+n), last token",
                xticks=range(n), yticks=range(1, n + 1))
    fig.colorbar(im, ax=axes[0])
    im = axes[1].imshow(np.array(report["cka"]), origin="lower", cmap="magma", vmin=0, vmax=1)
    axes[1].set(xlabel="block input j", ylabel="block input i", title="linear CKA", xticks=range(n + 1),
                yticks=range(n + 1))
    fig.colorbar(im, ax=axes[1])
    axes[2].bar(range(n), report["block_influence"])
    axes[2].set(xlabel="block", ylabel="BI", title="Block Influence (ShortGPT)", xticks=range(n))
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def analyze(model_path: str | Path, out: str | Path | None = None, opts: AnalyzeOptions | None = None, *,
            device: str = "auto", force: bool = False, progress: ProgressFn | None = None, **values) -> dict:
    """Similarity report for every block of the model at ``model_path`` on ``opts.data`` (``values`` replace
    fields of ``opts``, an :class:`AnalyzeOptions`); writes analysis.json and heatmap.png to the folder ``out``
    when given (atomically, refused inside an input or when it exists without ``force``). The metrics are
    accumulated one batch at a time (``block_similarity``): memory is the weights and one batch."""
    from ..eval import load_tokenizer
    from ..loading import load

    o = AnalyzeOptions.build(opts, **values)
    if not Path(o.data).exists():
        raise WeightsmithError(f"{o.data}: data file not found")
    inputs = [Path(model_path), Path(o.data)] + ([Path(o.tokenizer)] if o.tokenizer else [])
    if out is not None:
        check_output(out, inputs, force)
    dev = resolve_device(device)
    model = load(model_path, device=dev, dtype=o.dtype)  # as stored unless ``dtype`` says
    tok = load_tokenizer(o.tokenizer or model_path)
    windows = calibration_windows(tok, o.data, seq_len=model_seq(model, o.seq_len), max_tokens=o.max_tokens,
                                  causal=is_causal_lm(model))
    stats = block_similarity(model, windows, batch_size=o.batch_size, device=dev, progress=progress)
    n = len(block_list(model))
    del model  # the CKA's Gram matrices and the heatmap come after the weights are given back
    report = {"model": str(model_path), "data": str(o.data), "tokens": int(windows.numel()), **similarity_report(
        stats, remove=int(round(o.remove * n)))}
    if out is not None:
        with output_folder(out, inputs, force) as tmp:
            write_analysis(report, tmp)
        report["files"] = [str(Path(out) / name) for name in ANALYSIS_FILES]
    return report


ANALYSIS_FILES = ("analysis.json", "heatmap.png")


def write_analysis(report: dict, folder: Path) -> None:
    """analysis.json and heatmap.png of ``report`` into an existing (temporary) ``folder``."""
    (folder / "analysis.json").write_text(json.dumps(report, indent=2) + "\n")
    heatmap(report, folder / "heatmap.png", f"{Path(report['model']).name}: {report['num_blocks']} blocks, "
                                           f"{report['tokens']} tokens")
