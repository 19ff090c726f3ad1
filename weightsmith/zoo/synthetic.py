"""Randomly initialised models of any size, saved as normal HF folders (tests and benchmarks)."""
from __future__ import annotations

from pathlib import Path

import torch


def _save(model, path: Path, tokenizer_from: Path | None, shard_size: str | None) -> Path:
    kwargs = {"max_shard_size": shard_size} if shard_size else {}
    model.save_pretrained(path, **kwargs)
    if tokenizer_from is not None:
        from transformers import AutoTokenizer
        AutoTokenizer.from_pretrained(str(tokenizer_from)).save_pretrained(path)
    return Path(path)


def llama_config(**overrides):
    from transformers import LlamaConfig

    cfg = dict(vocab_size=128, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
               num_key_value_heads=4, max_position_embeddings=64, tie_word_embeddings=False, rms_norm_eps=1e-5)
    cfg.update(overrides)
    return LlamaConfig(**cfg)


def random_llama(path: str | Path, seed: int = 0, tokenizer_from: Path | None = None,
                 shard_size: str | None = None, **config) -> Path:
    from transformers import LlamaForCausalLM

    torch.manual_seed(seed)
    return _save(LlamaForCausalLM(llama_config(**config)).eval(), Path(path), tokenizer_from, shard_size)


def random_gpt2(path: str | Path, seed: int = 0, **config) -> Path:
    from transformers import GPT2Config, GPT2LMHeadModel

    cfg = dict(vocab_size=128, n_embd=32, n_layer=2, n_head=4, n_positions=64)
    cfg.update(config)
    torch.manual_seed(seed)
    return _save(GPT2LMHeadModel(GPT2Config(**cfg)).eval(), Path(path), None, None)


def random_bert(path: str | Path, seed: int = 0, classes: int | None = None, **config) -> Path:
    from transformers import BertConfig, BertForSequenceClassification, BertModel

    cfg = dict(vocab_size=128, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64,
               max_position_embeddings=64)
    cfg.update(config)
    torch.manual_seed(seed)
    if classes:
        model = BertForSequenceClassification(BertConfig(num_labels=classes, **cfg))
    else:
        model = BertModel(BertConfig(**cfg))
    return _save(model.eval(), Path(path), None, None)
