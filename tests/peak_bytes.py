"""The peak bytes of tensors alive at once while a block runs: every tensor an operator returns is counted once
per storage until its last tensor is freed (memory-mapped checkpoint tensors, made by no operator, are not).
Also a small bfloat16 Llama folder to measure stages on."""
from __future__ import annotations

import weakref

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves


def bf16_llama(path, seed: int = 0, **config):
    from transformers import LlamaForCausalLM

    from weightsmith.zoo.synthetic import llama_config

    torch.manual_seed(seed)
    shape = dict(hidden_size=128, intermediate_size=352, num_hidden_layers=4, num_attention_heads=4,
                 num_key_value_heads=2, vocab_size=256)
    LlamaForCausalLM(llama_config(**{**shape, **config})).to(torch.bfloat16).save_pretrained(path)
    return path


class PeakBytes(TorchDispatchMode):
    """``with PeakBytes() as p: ...`` then ``p.peak`` (bytes)."""

    def __init__(self) -> None:
        super().__init__()
        self.live = self.peak = 0
        self.refs: dict[int, int] = {}  # storage address -> tensors alive on it

    def _release(self, key: int, nbytes: int) -> None:
        self.refs[key] -= 1
        if not self.refs[key]:
            del self.refs[key]
            self.live -= nbytes

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in tree_leaves(out):
            if not isinstance(t, torch.Tensor) or t.is_meta or t.device.type != "cpu":
                continue
            storage = t.untyped_storage()
            key, nbytes = storage.data_ptr(), storage.nbytes()
            if not nbytes:
                continue
            if key not in self.refs:
                self.refs[key] = 0
                self.live += nbytes
                self.peak = max(self.peak, self.live)
            self.refs[key] += 1
            weakref.finalize(t, self._release, key, nbytes)
        return out
