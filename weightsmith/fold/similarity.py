"""Layer-similarity metrics on block inputs: angular distance (Gromov et al., arXiv 2403.17887),
Block Influence (ShortGPT) and linear CKA (Kornblith et al.; used by CRaSh to cluster layers).

``states[i]`` is the input of block i ([windows, tokens, hidden]); ``states[N]`` is the last block's output.
"""
from __future__ import annotations

import math

import torch

from .removal import SpilledStates


def _cos(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    return torch.nn.functional.cosine_similarity(a.float(), b.float(), dim=-1)


def angular(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """arccos(cos(a, b)) / pi along the last dimension, in [0, 1]."""
    return torch.arccos(_cos(a, b).clamp(-1.0, 1.0)) / math.pi


def angular_distance(states: list[torch.Tensor], last_token: bool = True) -> torch.Tensor:
    """D[l, n-1] = d(x_l, x_{l+n}) for n = 1..N (NaN where l+n > N); on the last token or averaged over tokens."""
    n_blocks = len(states) - 1
    d = torch.full((n_blocks, n_blocks), float("nan"))
    pick = (lambda s: s[:, -1]) if last_token else (lambda s: s)
    for l in range(n_blocks):
        for n in range(1, n_blocks - l + 1):
            d[l, n - 1] = angular(pick(states[l]), pick(states[l + n])).mean().item()
    return d


def block_influence(states: list[torch.Tensor]) -> torch.Tensor:
    """ShortGPT BI_i = 1 - mean over tokens of cos(x_i, x_{i+1})."""
    return torch.tensor([1.0 - _cos(states[i], states[i + 1]).mean().item() for i in range(len(states) - 1)])


def linear_cka(x: torch.Tensor, y: torch.Tensor) -> float:
    """Linear CKA of two [samples, features] matrices: ||Y'X||_F^2 / (||X'X||_F ||Y'Y||_F) after centring."""
    x = x.double() - x.double().mean(0)
    y = y.double() - y.double().mean(0)
    num = (y.T @ x).square().sum()
    den = (x.T @ x).norm() * (y.T @ y).norm()
    return float(num / den) if den > 0 else float("nan")


def cka_matrix(states: list[torch.Tensor], max_tokens: int | None = 1024, seed: int = 0) -> torch.Tensor:
    """Linear CKA between every pair of block inputs, on up to ``max_tokens`` tokens drawn at random.

    Uses <X X', Y Y'> (token Gram matrices) or ||Y'X||^2 (feature products), whichever costs less.
    """
    flat = [s.reshape(-1, s.shape[-1]) for s in states]
    if max_tokens and flat[0].shape[0] > max_tokens:
        idx = torch.randperm(flat[0].shape[0], generator=torch.Generator().manual_seed(seed))[:max_tokens]
        flat = [f[idx.to(f.device)] for f in flat]
    if gram_form(*flat[0].shape, len(flat)):
        return gram_cka([_gram(_centred(f)) for f in flat])
    k = len(states)
    m = torch.eye(k)
    centred = [_centred(f) for f in flat]
    norms = [(c.T @ c).norm() for c in centred]
    pair = lambda i, j: (centred[j].T @ centred[i]).square().sum()  # noqa: E731
    for i in range(k):
        for j in range(i + 1, k):
            m[i, j] = m[j, i] = float(pair(i, j) / (norms[i] * norms[j]))
    return m


def gram_form(n: int, d: int, k: int) -> bool:
    """Whether CKA over ``k`` sets of ``n`` tokens x ``d`` features costs less through token Gram matrices."""
    return n * k < d * k * (k - 1) / 2


def gram_cka(grams: list[torch.Tensor]) -> torch.Tensor:
    """Linear CKA of every pair from the centred token Gram matrices: <K_i, K_j> / (||K_i|| ||K_j||)."""
    k = len(grams)
    norms = [g.norm() for g in grams]
    m = torch.eye(k)
    for i in range(k):
        for j in range(i + 1, k):
            m[i, j] = m[j, i] = float((grams[i] * grams[j]).sum() / (norms[i] * norms[j]))
    return m


def _centred(x: torch.Tensor) -> torch.Tensor:
    x = x.float()
    return x - x.mean(0)


def _gram(c: torch.Tensor) -> torch.Tensor:
    return c @ c.T


def shortgpt_drop(bi: torch.Tensor, k: int) -> list[int]:
    """The ``k`` blocks with the lowest Block Influence."""
    return sorted(torch.argsort(bi)[:k].tolist())


def angular_drop(dist: torch.Tensor, k: int) -> list[int]:
    """The span of ``k`` consecutive blocks l..l+k-1 whose input and output are closest (min d(l, l+k))."""
    if k == 0:
        return []
    col = dist[: dist.shape[0] - k + 1, k - 1]
    l = int(torch.argmin(col))
    return list(range(l, l + k))


class RunningSimilarity:
    """The metrics above accumulated one batch of block states at a time, so that only one batch's states are
    held (in the model's dtype; each pair upcast as it is compared): sums for BI and the token-mean angular
    distance, each window's last token for the last-token angular distance, and the CKA's sampled tokens
    (the ``max_tokens`` tokens ``cka_matrix`` would draw from the whole set).

    ``take`` takes the [windows, tokens, hidden] states of the block inputs and the last output."""

    def __init__(self, total_tokens: int, *, mean_angular: bool = True, cka_tokens: int | None = 1024,
                 cka: bool = True, seed: int = 0):
        self.mean_angular, self.cka = mean_angular, cka
        self.cos_sum: torch.Tensor | None = None
        self.ang_sum: torch.Tensor | None = None
        self.tokens = 0
        self.last: list[list[torch.Tensor]] = []
        self.sampled: list[list[int]] = []  # per state, its sampled tokens of each batch in the spill file
        sample = torch.arange(total_tokens)
        if cka_tokens and total_tokens > cka_tokens:
            sample = torch.randperm(total_tokens, generator=torch.Generator().manual_seed(seed))[:cka_tokens]
        self.sample = torch.zeros(total_tokens, dtype=torch.bool)
        self.sample[sample] = True
        self._held: list[int] = []  # this batch's states so far, in the spill file
        self._previous: torch.Tensor | None = None
        self._spilled = SpilledStates() if mean_angular or cka else None

    def take(self, i: int, state: torch.Tensor, k: int) -> None:
        """State ``i`` of ``k`` of the current batch, as the forward pass reaches it. Only the previous one is
        held: the earlier ones the token-mean angular distance compares (every pair) and the CKA's sampled
        tokens wait in a temporary file (read back one tensor at a time) rather than beside the weights."""
        if i == 0:
            self._start(k)
            self._held = []
        count = state.shape[0] * state.shape[1]
        if i:
            self.cos_sum[i - 1] += _cos(self._previous, state).double().sum()
        if self.mean_angular:
            for n, index in enumerate(reversed(self._held), 1):
                earlier = self._previous if n == 1 else self._spilled.get(index).to(state.device)
                self.ang_sum[i - n, n - 1] += angular(earlier, state).double().sum()
            if i < k - 1:
                self._held.append(self._spilled.add(state))
        self._previous = state
        self.last[i].append(state[:, -1:].float().cpu())
        if self.cka:
            self.sampled[i].append(self._spilled.add(
                state.reshape(-1, state.shape[-1])[self.sample[self.tokens:self.tokens + count].to(state.device)]))
        if i == k - 1:
            self._held, self._previous = [], None
            self.tokens += count

    def _start(self, k: int) -> None:
        if self.cos_sum is None:
            self.cos_sum = torch.zeros(k - 1, dtype=torch.float64)
            self.ang_sum = torch.zeros(k - 1, k - 1, dtype=torch.float64)
            self.last = [[] for _ in range(k)]
            self.sampled = [[] for _ in range(k)]

    def block_influence(self) -> torch.Tensor:
        return (1.0 - self.cos_sum / self.tokens).float()

    def angular_distance(self, last_token: bool = True) -> torch.Tensor:
        if last_token:
            return angular_distance([torch.cat(t) for t in self.last], last_token=True)
        d = (self.ang_sum / self.tokens).float()
        n = d.shape[0]
        return d.masked_fill(torch.arange(n)[:, None] + torch.arange(1, n + 1)[None, :] > n, float("nan"))

    def cka_matrix(self) -> torch.Tensor:
        """CKA of the sampled tokens. In Gram form each block input's tokens are dropped once its Gram matrix is
        formed (asked for once)."""
        def tokens(i: int) -> torch.Tensor:
            return torch.cat([self._spilled.get(j) for j in self.sampled[i]])

        shapes = [self._spilled.where[j][3] for j in self.sampled[0]]
        n, d, k = sum(shape[0] for shape in shapes), shapes[0][-1], len(self.sampled)
        if not gram_form(n, d, k):
            return cka_matrix([tokens(i)[None] for i in range(k)], max_tokens=None)
        grams = []
        for i in range(k):
            grams.append(_gram(_centred(tokens(i))))
            self.sampled[i] = []
        return gram_cka(grams)
