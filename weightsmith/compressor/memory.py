"""The hashed parameter memory of RPS and the layers that read their weights from it.

One array of m slots serves every compressed module (global sharing) or each module gets its
own region (module sharing). A weight is W[i] = z[h(i)] g(i) lambda (arXiv 2310.11611);
the index map is recomputed from the seed, one module at a time, unless ``cache_index`` is on
(training), in which case it is kept per module and counted as resident memory.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import InvalidChoice, OutOfRange
from ..stage_options import RPS_SHARING
from .hashing import MAPPINGS, random_fold_slots, roast_slots, roast_tile_count, roast_tile_shape, sign_hash

SHARING = RPS_SHARING


@dataclass
class ModuleSpec:
    """Where one compressed module's weights live in the index space and in the memory."""
    name: str
    kind: str  # "linear" | "embedding"
    shape: tuple[int, int]
    offset: int  # first global index of this module's weights
    base: int  # first slot of the memory region it reads
    slots: int  # size of that region
    tile_offset: int  # first ROAST tile id
    scale: float = 1.0  # lambda
    bias: bool = False

    @property
    def numel(self) -> int:
        return self.shape[0] * self.shape[1]

    def to_dict(self) -> dict:
        d = asdict(self)
        d["shape"] = list(self.shape)
        return d

    @classmethod
    def from_dict(cls, d: dict) -> "ModuleSpec":
        return cls(**{**d, "shape": tuple(d["shape"])})


def plan_specs(modules: list[tuple[str, str, tuple[int, int], bool]], budget: float, sharing: str, mapping: str,
               tile: int) -> list[ModuleSpec]:
    """Lay the modules (name, kind, shape, has_bias) out in index space and memory for ``budget``."""
    if sharing not in SHARING:
        raise InvalidChoice("sharing", sharing, SHARING)
    if mapping not in MAPPINGS:
        raise InvalidChoice("mapping", mapping, MAPPINGS)
    if not budget > 0:
        raise OutOfRange("budget", budget, 0, None, lo_open=True)
    total = sum(s[0] * s[1] for _, _, s, _ in modules)
    m_global = max(2, round(budget * total))
    specs, offset, base, tiles = [], 0, 0, 0
    for name, kind, shape, bias in modules:
        n = shape[0] * shape[1]
        slots = m_global if sharing == "global" else max(2, round(budget * n))
        specs.append(ModuleSpec(name, kind, tuple(shape), offset, 0 if sharing == "global" else base, slots, tiles,
                                1.0, bias))
        offset += n
        base += slots
        tiles += roast_tile_count(shape, roast_tile_shape(shape, slots, tile))
    return specs


class HashedMemory(nn.Module):
    """The slot array z plus the recipe (mapping, seed, specs) that maps weights onto it."""

    def __init__(self, specs: list[ModuleSpec], *, mapping: str, seed: int, sharing: str, tile: int = 64,
                 grad_scaling: bool | None = None, dtype: torch.dtype = torch.float32,
                 device: str | torch.device = "cpu", data: torch.Tensor | None = None):
        super().__init__()
        self.specs = {s.name: s for s in specs}
        self.mapping, self.seed, self.sharing, self.tile = mapping, seed, sharing, tile
        size = max(s.base + s.slots for s in specs)
        # ``data`` (slot values already stored) is taken as it is rather than copied over zeros
        self.memory = nn.Parameter(data if data is not None else torch.zeros(size, dtype=dtype, device=device))
        self.grad_scaling = (mapping == "stable") if grad_scaling is None else grad_scaling
        self.cache_index = False
        self._cache: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
        self._grad_divisor: torch.Tensor | None = None
        self.memory.register_hook(self._scale_grad)

    @property
    def num_slots(self) -> int:
        return self.memory.numel()

    def _positions(self, spec: ModuleSpec, rows: torch.Tensor, cols: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Absolute slot and sign g for weight positions (rows, cols) of ``spec``."""
        local = rows * spec.shape[1] + cols
        index = spec.offset + local
        if self.mapping == "stable":
            if self.sharing == "global":
                slot = random_fold_slots(self.seed, index, spec.slots)
            else:  # each module folds its own index space; its offset decorrelates the chunk shifts
                slot = random_fold_slots(self.seed, local, spec.slots, chunk_offset=spec.offset)
        else:
            tile = roast_tile_shape(spec.shape, spec.slots, self.tile)
            slot = roast_slots(self.seed, rows, cols, spec.shape, spec.tile_offset, spec.slots, tile)
        return spec.base + slot, sign_hash(self.seed, index)

    def index(self, spec: ModuleSpec) -> tuple[torch.Tensor, torch.Tensor]:
        """Slots and signs of a module's whole weight (flattened, row-major)."""
        if spec.name in self._cache:
            return self._cache[spec.name]
        dev = self.memory.device
        rows = torch.arange(spec.shape[0], device=dev).unsqueeze(1)
        cols = torch.arange(spec.shape[1], device=dev).unsqueeze(0)
        slot, sign = self._positions(spec, rows, cols)
        slot, sign = slot.reshape(-1), sign.reshape(-1)
        if self.cache_index:
            self._cache[spec.name] = (slot.to(torch.int32 if self.num_slots < 2**31 else torch.int64),
                                      sign.to(torch.int8))
            return self._cache[spec.name]
        return slot, sign

    def clear_cache(self) -> None:
        self._cache.clear()
        self._grad_divisor = None

    def weight(self, spec: ModuleSpec) -> torch.Tensor:
        slot, sign = self.index(spec)
        return (self.memory[slot.long()] * sign.to(self.memory.dtype) * spec.scale).view(spec.shape)

    def rows(self, spec: ModuleSpec, ids: torch.Tensor) -> torch.Tensor:
        """Only the requested rows of an embedding: ids (...,) -> (..., dim)."""
        cols = torch.arange(spec.shape[1], device=ids.device)
        slot, sign = self._positions(spec, ids.reshape(-1, 1).to(torch.int64), cols.unsqueeze(0))
        return (self.memory[slot] * sign.to(self.memory.dtype) * spec.scale).view(*ids.shape, spec.shape[1])

    def slot_stats(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Per slot: how many weights map to it, and the sum of their lambdas."""
        count = torch.zeros(self.num_slots, dtype=torch.float64, device=self.memory.device)
        lam = torch.zeros_like(count)
        for spec in self.specs.values():
            slot, _ = self.index(spec)
            slot = slot.long()
            count.scatter_add_(0, slot, torch.ones_like(slot, dtype=torch.float64))
            lam.scatter_add_(0, slot, torch.full_like(slot, spec.scale, dtype=torch.float64))
        return count, lam

    def _scale_grad(self, grad: torch.Tensor) -> torch.Tensor:
        """STABLE-RPS: slot j's gradient divided by s_j = (sum of lambdas hashed to j)^2 / count_j."""
        if not self.grad_scaling:
            return grad
        if self._grad_divisor is None or self._grad_divisor.device != grad.device:
            count, lam = self.slot_stats()
            s = torch.where(count > 0, lam.square() / count.clamp(min=1), torch.ones_like(lam))
            self._grad_divisor = s.to(grad.device, grad.dtype)
        return grad / self._grad_divisor

    def config(self) -> dict:
        return {"mapping": self.mapping, "seed": self.seed, "sharing": self.sharing, "tile": self.tile,
                "grad_scaling": self.grad_scaling, "slots": self.num_slots,
                "modules": [s.to_dict() for s in self.specs.values()]}

    @classmethod
    def from_config(cls, cfg: dict, dtype: torch.dtype = torch.float32, device: str | torch.device = "cpu",
                    data: torch.Tensor | None = None) -> "HashedMemory":
        specs = [ModuleSpec.from_dict(d) for d in cfg["modules"]]
        return cls(specs, mapping=cfg["mapping"], seed=cfg["seed"], sharing=cfg["sharing"], tile=cfg["tile"],
                   grad_scaling=cfg.get("grad_scaling"), dtype=dtype, device=device, data=data)


class RPSLinear(nn.Module):
    """nn.Linear whose weight is read from a HashedMemory, materialised only inside forward."""

    def __init__(self, memory: HashedMemory, spec: ModuleSpec, bias: torch.Tensor | None = None):
        super().__init__()
        object.__setattr__(self, "hashed", memory)  # not a submodule: the model owns the memory once
        self.spec = spec
        self.in_features, self.out_features = spec.shape[1], spec.shape[0]
        self.bias = nn.Parameter(bias) if bias is not None else None

    @property
    def weight(self) -> torch.Tensor:
        return self.hashed.weight(self.spec)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        w = self.hashed.weight(self.spec).to(x.dtype)
        return F.linear(x, w, None if self.bias is None else self.bias.to(x.dtype))

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, slots={self.spec.slots}"


class RPSEmbedding(nn.Module):
    """nn.Embedding that gathers only the looked-up rows from a HashedMemory."""

    def __init__(self, memory: HashedMemory, spec: ModuleSpec, padding_idx: int | None = None):
        super().__init__()
        object.__setattr__(self, "hashed", memory)
        self.spec = spec
        self.num_embeddings, self.embedding_dim = spec.shape
        self.padding_idx = padding_idx

    @property
    def weight(self) -> torch.Tensor:
        return self.hashed.weight(self.spec)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.hashed.rows(self.spec, ids)

    def extra_repr(self) -> str:
        return f"{self.num_embeddings}, {self.embedding_dim}, slots={self.spec.slots}"


def resident_bytes(model: nn.Module) -> dict:
    """Bytes held by parameters, buffers and cached index maps (shared tensors counted once)."""
    seen: set[int] = set()
    params = buffers = 0
    for p in model.parameters():
        if p.data_ptr() not in seen:
            seen.add(p.data_ptr())
            params += p.numel() * p.element_size()
    for b in model.buffers():
        if b.data_ptr() not in seen:
            seen.add(b.data_ptr())
            buffers += b.numel() * b.element_size()
    index = 0
    for mod in model.modules():
        if isinstance(mod, HashedMemory):
            index += sum(s.numel() * s.element_size() + g.numel() * g.element_size() for s, g in mod._cache.values())
    return {"parameters": params, "buffers": buffers, "index_cache": index, "total": params + buffers + index}
