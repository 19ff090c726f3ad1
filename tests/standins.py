"""Tiny stand-in models for the mergekit-tool comparisons: bases, fine-tunes moved by planted deltas, and a
word-level tokenizer (tokens ``_tok_3`` .. ``_tok_127``) that mergekit's prompt tokenization can use."""
from __future__ import annotations

from pathlib import Path

import torch


def finetune(base: Path, out: Path, rank: int | None = None, seed: int = 1) -> Path:
    """``base`` with every tensor moved: by dense noise, or (rank) by a planted rank-``rank`` product."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(base)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            if rank is None or p.dim() == 1:
                p.add_(0.02 * torch.randn(p.shape, generator=g))
            else:
                p.add_(0.1 * torch.randn(p.shape[0], rank, generator=g) @ torch.randn(rank, p.shape[1], generator=g))
    model.save_pretrained(out)
    return out


def qwen2(path: Path) -> Path:
    from transformers import Qwen2Config, Qwen2ForCausalLM

    torch.manual_seed(0)
    cfg = Qwen2Config(vocab_size=128, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                      num_key_value_heads=2, max_position_embeddings=64, tie_word_embeddings=True)
    Qwen2ForCausalLM(cfg).eval().save_pretrained(path)
    return path


def word_tokenizer(folder: Path) -> None:
    import tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {t: i for i, t in enumerate(["<unk>", "<s>", "</s>"] + [f"_tok_{i}" for i in range(3, 128)])}
    tok = tokenizers.Tokenizer(tokenizers.models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = tokenizers.pre_tokenizers.WhitespaceSplit()
    PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", bos_token="<s>",
                            eos_token="</s>").save_pretrained(folder)
