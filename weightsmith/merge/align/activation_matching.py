"""Activation matching (Git Re-Basin §3.1; PLeaS step 1): per group, one linear assignment on the similarity
of A's and B's unit activations on the same calibration batches.

Similarity ``euclidean`` (default, as the PLeaS reference code): -Σ‖a_i − b_j‖² summed over batches and over
every site of the group (each refit layer's input and output carrying it); heads compare whole head vectors.
``correlation``: Pearson correlation of the pooled site statistics, summed over a head's entries.
"""
from __future__ import annotations

import torch
from scipy.optimize import linear_sum_assignment
from torch import nn

from ...errors import InvalidChoice, WeightsmithError
from ...progress import ProgressFn, track
from ...stage_options import MATCH_METRICS
from .capture import capture, forward
from .spec import PermSpec

METRICS = MATCH_METRICS


class _Stats:
    def __init__(self, c: int, device, dtype) -> None:
        z = lambda *s: torch.zeros(*s, device=device, dtype=dtype)  # noqa: E731
        self.cross, self.sa, self.sb, self.qa, self.qb, self.n = z(c, c), z(c), z(c), z(c), z(c), 0

    def add(self, a: torch.Tensor, b: torch.Tensor) -> None:
        self.cross += a.T @ b
        self.sa += a.sum(0)
        self.sb += b.sum(0)
        self.qa += (a * a).sum(0)
        self.qb += (b * b).sum(0)
        self.n += a.shape[0]

    def similarity(self, units: int, block: int, metric: str) -> torch.Tensor:
        if metric == "euclidean":
            full = 2 * self.cross - self.qa[:, None] - self.qb[None, :]
        else:
            n = max(self.n, 1)
            cov = self.cross / n - torch.outer(self.sa, self.sb) / n**2
            sd_a = (self.qa / n - (self.sa / n) ** 2).clamp_min(0).sqrt()
            sd_b = (self.qb / n - (self.sb / n) ** 2).clamp_min(0).sqrt()
            full = cov / (torch.outer(sd_a, sd_b) + 1e-8)
        return full.reshape(units, block, units, block).diagonal(dim1=1, dim2=3).sum(-1)


class SimilarityStats:
    """Per (group, block) sums over the sites of refit layers: each layer's input and output activations
    carrying a group; ``similarity`` turns the sums of the groups asked for into (n_A × n_B) matrices."""

    def __init__(self, spec: PermSpec, metric: str, device) -> None:
        if metric not in METRICS:
            raise InvalidChoice("metric", metric, METRICS)
        self.spec, self.metric, self.device = spec, metric, device
        self.dt = torch.float64 if torch.device(device).type == "cpu" else torch.float32
        self.stats: dict[tuple[str, int], _Stats] = {}

    def add(self, layers, acts_a: dict, acts_b: dict, rename=None) -> None:
        """Add one batch's captured activations of ``layers`` (``rename`` maps a layer to its capture key)."""
        for layer in layers:
            key = rename(layer.module) if rename else layer.module
            for which, group, block in ((0, layer.in_group, layer.in_block), (1, layer.out_group, layer.out_block)):
                if group:
                    a, b = acts_a[key][which].to(self.dt), acts_b[key][which].to(self.dt)
                    if (group, block) not in self.stats:
                        self.stats[(group, block)] = _Stats(a.shape[1], self.device, self.dt)
                    self.stats[(group, block)].add(a, b)

    def similarity(self, groups) -> dict[str, torch.Tensor]:
        """The groups' similarities; their sums are dropped."""
        sims: dict[str, torch.Tensor] = {}
        for group, block in [k for k in self.stats if k[0] in groups]:
            s = self.stats.pop((group, block)).similarity(self.spec.groups[group].size, block, self.metric)
            sims[group] = sims[group] + s if group in sims else s
        missing = [g for g in groups if g not in sims]
        if missing:
            raise WeightsmithError(f"no activations reached group {missing[0]}; the model never used it on the "
                                   "calibration data")
        return {g: s.cpu() for g, s in sims.items()}


@torch.no_grad()
def activation_similarity(model_a: nn.Module, model_b: nn.Module, spec: PermSpec, batches, *,
                          metric: str = "euclidean", device: str | torch.device = "cpu",
                          progress: ProgressFn | None = None) -> dict[str, torch.Tensor]:
    """Per group, the (n_A × n_B) similarity of unit activations accumulated over ``batches``."""
    stats = SimilarityStats(spec, metric, device)
    with capture(model_a, spec.layers) as acts_a, capture(model_b, spec.layers) as acts_b:
        for batch in track(progress, "activation statistics", batches):
            batch = batch.to(device)
            forward(model_a, batch)
            forward(model_b, batch)
            stats.add(spec.layers, acts_a, acts_b)
    return stats.similarity(list(spec.groups))


def assign(similarity: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Per group, B's unit for each of A's units maximising the summed similarity."""
    perms = {}
    for g, s in similarity.items():
        _, cols = linear_sum_assignment(s.numpy(), maximize=True)
        perms[g] = torch.as_tensor(cols)
    return perms


def activation_matching(model_a: nn.Module, model_b: nn.Module, spec: PermSpec, batches, *,
                        metric: str = "euclidean", device: str | torch.device = "cpu",
                        progress: ProgressFn | None = None) -> dict[str, torch.Tensor]:
    return assign(activation_similarity(model_a, model_b, spec, batches, metric=metric, device=device,
                                        progress=progress))
