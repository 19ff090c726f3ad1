"""Index maps of randomized parameter sharing: weight position -> memory slot and sign.

Follows Desai & Shrivastava, "In defense of parameter sharing for model-compression"
(arXiv 2310.11611): ROAST tiles hashed to contiguous slot ranges, and STABLE-RPS's
RandomFold (a random cyclic shift per size-m chunk of the global index). Every map is a
pure function of (seed, index), so it is recomputed when needed and never stored.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from ..stage_options import RPS_MAPPINGS

P = 2038074743  # the prime of the universal hash family
MAPPINGS = RPS_MAPPINGS


@dataclass(frozen=True)
class UniversalHash:
    """h(x) = ((a x + b x^2 + c) mod P), with a, b, c odd and drawn from a seed."""
    a: int
    b: int
    c: int

    @classmethod
    def from_seed(cls, seed: int, salt: int) -> "UniversalHash":
        gen = torch.Generator().manual_seed(seed * 1_000_003 + salt)
        a, b, c = (int(v) | 1 for v in torch.randint(1, P - 1, (3,), generator=gen))
        return cls(a % P, b % P, c % P)

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        # Every product stays below 2^62: operands are reduced mod P (< 2^31) before multiplying.
        # Indices are non-negative, so fmod (much faster than remainder on CPU) is the same thing.
        x = torch.fmod(x.to(torch.int64), P)
        sq = torch.fmod(x * x, P)
        return torch.fmod(torch.fmod(self.a * x, P) + torch.fmod(self.b * sq, P) + self.c, P)


def sign_hash(seed: int, index: torch.Tensor) -> torch.Tensor:
    """g(i) in {-1, +1} as float32: the top bit of a multiply-shift hash (a x + b) mod 2^64.

    One multiply per weight, so the signs of a whole module are cheap to recompute in forward.
    """
    gen = torch.Generator().manual_seed(seed * 1_000_003 + 2)
    a, b = (int(v) for v in torch.randint(-2**62, 2**62, (2,), generator=gen))
    mixed = index.to(torch.int64) * (a | 1) + b  # wraps modulo 2^64
    return torch.where(mixed < 0, -1.0, 1.0)


def random_fold_slots(seed: int, index: torch.Tensor, m: int, chunk_offset: int = 0) -> torch.Tensor:
    """STABLE-RPS RandomFold: i -> (h(floor(i/m)) + i mod m) mod m; a permutation of each size-m chunk.

    Only the few distinct chunks floor(i/m) are hashed; each weight then costs a div and an add.
    """
    chunk = torch.div(index, m, rounding_mode="trunc")
    first, last = int(chunk.min()), int(chunk.max())
    shifts = torch.fmod(UniversalHash.from_seed(seed, 1)(chunk_offset + torch.arange(first, last + 1,
                                                                                      device=index.device)), m)
    offset = index - chunk * m
    return torch.fmod(shifts[chunk - first] + offset, m)


def roast_tile_shape(shape: tuple[int, ...], m: int, tile: int) -> tuple[int, int]:
    """A 2-D tile of about ``tile`` elements (square-ish, clipped to the weight and the memory)."""
    rows, cols = (shape[0], shape[1]) if len(shape) == 2 else (1, shape[0])
    tile = max(1, min(tile, m - 1)) if m > 1 else 1
    tc = min(cols, max(1, int(round(tile ** 0.5))))
    tr = min(rows, max(1, tile // tc))
    return tr, tc


def roast_slots(seed: int, rows: torch.Tensor, cols: torch.Tensor, shape: tuple[int, int], tile_offset: int,
                m: int, tile: tuple[int, int]) -> torch.Tensor:
    """ROAST: tile (r // tr, c // tc) starts at h(tile id) mod (m - tile size); its elements are contiguous."""
    tr, tc = tile
    tiles_per_row = -(-shape[1] // tc)
    tile_cols = torch.arange(tiles_per_row, device=rows.device).unsqueeze(0)
    # One hash per (row, tile column); each weight then looks up its tile's start.
    tile_id = tile_offset + (rows // tr) * tiles_per_row + tile_cols
    span = max(1, m - tr * tc)
    start = torch.fmod(UniversalHash.from_seed(seed, 1)(tile_id), span)
    col_tile = (cols // tc).reshape(-1)
    start = start.index_select(-1, col_tile)
    return start + (rows % tr) * tc + cols % tc


def roast_tile_count(shape: tuple[int, int], tile: tuple[int, int]) -> int:
    return -(-shape[0] // tile[0]) * -(-shape[1] // tile[1])
