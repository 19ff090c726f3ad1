"""Where the repeated blocks of a checkpoint live, and which tensors are embeddings, heads, norms.

Found from config.json's ``model_type`` and the tensor names, per architecture family; a
family we do not know is a clear error rather than a guess.
"""
from __future__ import annotations

import re
from dataclasses import dataclass, field

from ..errors import WeightsmithError

# model_type -> (candidate block prefixes, embedding patterns, head patterns, final-norm patterns)
_LLAMA = (("model.layers.", "layers.", "model.model.layers."),
          (r"embed_tokens\.",), (r"^lm_head\.",), (r"(^|\.)norm\.weight$",))
FAMILIES: dict[str, tuple[tuple[str, ...], tuple[str, ...], tuple[str, ...], tuple[str, ...]]] = {
    "llama": _LLAMA, "mistral": _LLAMA, "qwen2": _LLAMA, "qwen3": _LLAMA, "gemma": _LLAMA, "gemma2": _LLAMA,
    "phi3": _LLAMA, "olmo": _LLAMA, "olmo2": _LLAMA,
    "gpt2": (("transformer.h.", "h."), (r"(^|\.)wte\.", r"(^|\.)wpe\."), (r"^lm_head\.", r"^score\."), (r"(^|\.)ln_f\.",)),
    "bert": (("bert.encoder.layer.", "encoder.layer.", "model.encoder.layer."),
             (r"(^|\.)embeddings\.",), (r"(^|\.)(classifier|cls|pooler)\.",), ()),
}
FAMILIES["roberta"] = (("roberta.encoder.layer.", "encoder.layer."),) + FAMILIES["bert"][1:]
_NORM = re.compile(r"(norm|LayerNorm|(^|\.)ln_\w*)\.?(weight|bias)?$|\.ln_\d\.", re.IGNORECASE)


def num_layers(config: dict) -> int | None:
    for key in ("num_hidden_layers", "n_layer", "num_layers"):
        if isinstance(config.get(key), int):
            return config[key]
    return None


@dataclass
class Layout:
    model_type: str
    block_prefix: str
    num_blocks: int
    embeddings: list[str] = field(default_factory=list)
    head: list[str] = field(default_factory=list)
    final_norm: list[str] = field(default_factory=list)

    def block_of(self, name: str) -> int | None:
        if not name.startswith(self.block_prefix):
            return None
        idx = name[len(self.block_prefix):].split(".", 1)[0]
        return int(idx) if idx.isdigit() else None

    def block_key(self, name: str) -> str | None:
        """Name inside its block, e.g. 'mlp.up_proj.weight' (None for non-block tensors)."""
        if self.block_of(name) is None:
            return None
        return name[len(self.block_prefix):].split(".", 1)[1]

    def block_name(self, index: int, key: str) -> str:
        return f"{self.block_prefix}{index}.{key}"

    def kind(self, name: str) -> str:
        if name in self.embeddings:
            return "embedding"
        if name in self.head:
            return "head"
        if name in self.final_norm or is_norm(name):
            return "norm"
        if self.block_of(name) is not None:
            return "block"
        return "other"

    def to_dict(self) -> dict:
        return {"model_type": self.model_type, "block_prefix": self.block_prefix, "num_blocks": self.num_blocks,
                "embeddings": self.embeddings, "head": self.head, "final_norm": self.final_norm}


def is_norm(name: str) -> bool:
    return bool(_NORM.search(name))


def detect_layout(config: dict | None, names: list[str], where: str = "model") -> Layout:
    if not config:
        raise WeightsmithError(f"{where}: config.json is missing, so the architecture is unknown")
    model_type = config.get("model_type")
    if model_type not in FAMILIES:
        raise WeightsmithError(
            f"{where}: model_type {model_type!r} has no known block layout; supported: {', '.join(sorted(FAMILIES))}")
    prefixes, emb, head, fnorm = FAMILIES[model_type]
    n = num_layers(config)
    for prefix in prefixes:
        found = {int(m.group(1)) for nm in names if (m := re.match(re.escape(prefix) + r"(\d+)\.", nm))}
        if not found:
            continue
        if n is not None and found != set(range(n)):
            raise WeightsmithError(
                f"{where}: config says {n} layers but tensors under {prefix!r} cover blocks {sorted(found)}")
        count = n if n is not None else max(found) + 1
        non_block = [nm for nm in names if not nm.startswith(prefix)]
        return Layout(
            model_type=model_type, block_prefix=prefix, num_blocks=count,
            embeddings=[nm for nm in non_block if any(re.search(p, nm) for p in emb)],
            head=[nm for nm in non_block if any(re.search(p, nm) for p in head)],
            final_norm=[nm for nm in non_block if any(re.search(p, nm) for p in fnorm)],
        )
    raise WeightsmithError(
        f"{where}: no tensors under any of {', '.join(prefixes)} for model_type {model_type!r}; unexpected tensor names "
        f"(first: {names[0] if names else 'none'!r})")
