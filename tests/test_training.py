"""The shared training machinery: schedule, windows, calibration windows and the one training loop."""
from __future__ import annotations

import math

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from weightsmith.errors import OptionError
from weightsmith.data import calibration_windows
from weightsmith.training import lr_at, random_windows, train_lm


def test_lr_warms_up_linearly_then_decays_by_cosine_to_a_tenth():
    lr, steps, warmup = 1.0, 100, 10
    assert [lr_at(s, steps, lr, warmup) for s in range(3)] == pytest.approx([0.1, 0.2, 0.3])
    assert lr_at(warmup, steps, lr, warmup) == pytest.approx(1.0)
    mid = warmup + (steps - warmup) // 2
    assert lr_at(mid, steps, lr, warmup) == pytest.approx(0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * 0.5)))
    assert lr_at(steps, steps, lr, warmup) == pytest.approx(0.1)


def test_random_windows_are_contiguous_slices_of_the_stream():
    tokens = torch.arange(1000)
    x = random_windows(tokens, 6, 17, torch.Generator().manual_seed(0))
    assert x.shape == (6, 17)
    assert torch.equal(x - x[:, :1], torch.arange(17).expand(6, 17))
    assert int(x.max()) < 1000


def _model() -> LlamaForCausalLM:
    torch.manual_seed(0)
    return LlamaForCausalLM(LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                        num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=32))


def _reference(model, tokens, steps, lr, batch_size, seq_len, seed, momentum):
    """An independent SGD loop: the same windows and schedule, written out step by step."""
    gen = torch.Generator().manual_seed(seed)
    opt = torch.optim.SGD(model.parameters(), lr=lr, momentum=momentum)
    warmup = max(1, steps // 20)
    model.train()
    for step in range(steps):
        if step < warmup:
            rate = lr * (step + 1) / warmup
        else:
            rate = lr * (0.1 + 0.45 * (1 + math.cos(math.pi * (step - warmup) / max(1, steps - warmup))))
        opt.param_groups[0]["lr"] = rate
        starts = torch.randint(0, tokens.numel() - seq_len - 1, (batch_size,), generator=gen)
        x = torch.stack([tokens[s:s + seq_len] for s in starts.tolist()])
        loss = model(input_ids=x, labels=x).loss
        opt.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
    model.eval()


def test_train_lm_matches_an_independent_loop_bit_for_bit():
    tokens = torch.randint(0, 64, (600,), generator=torch.Generator().manual_seed(1))
    a, b = _model(), _model()
    seen = []
    losses = train_lm(a, tokens, steps=6, lr=0.05, batch_size=3, seq_len=12, seed=4, optimizer="sgd", momentum=0.9,
                      on_step=lambda step, loss: seen.append(step))
    _reference(b, tokens, 6, 0.05, 3, 12, 4, 0.9)
    assert seen == [1, 2, 3, 4, 5, 6] and len(losses) == 6 and not a.training
    for (name, p), q in zip(a.state_dict().items(), b.state_dict().values()):
        assert torch.equal(p, q), name


def test_train_lm_leaves_frozen_parameters_alone():
    tokens = torch.randint(0, 64, (600,), generator=torch.Generator().manual_seed(1))
    model = _model()
    frozen = model.model.embed_tokens.weight
    frozen.requires_grad_(False)
    before = frozen.clone()
    train_lm(model, tokens, steps=3, lr=0.05, batch_size=2, seq_len=8, seed=0)
    assert torch.equal(frozen, before)


def test_calibration_windows_cut_the_eos_joined_stream(zoo, tmp_path):
    from weightsmith.eval import load_texts, load_tokenizer, tokenize

    tok = load_tokenizer(zoo.tokenizer)
    data = zoo.data("general", "calib")
    w = calibration_windows(tok, data, seq_len=50, max_tokens=1000)
    stream = tokenize(tok, load_texts(data), 1000)
    assert w.shape == (1000 // 50, 50)
    assert torch.equal(w.flatten(), stream[: w.numel()])
    with pytest.raises(OptionError, match="fewer than one window of seq_len 5000"):
        calibration_windows(tok, data, seq_len=5000, max_tokens=1000)


def test_encoder_windows_are_wrapped_in_cls_and_sep(tmp_path):
    from weightsmith.eval import load_tokenizer
    from weightsmith.zoo import minilm_path

    tok = load_tokenizer(minilm_path())
    f = tmp_path / "t.txt"
    f.write_text("the quick brown fox jumps over the lazy dog " * 20)
    w = calibration_windows(tok, f, seq_len=16, max_tokens=128, causal=False)
    assert w.shape == (8, 16)
    assert (w[:, 0] == tok.cls_token_id).all() and (w[:, -1] == tok.sep_token_id).all()
    assert not ((w[:, 1:-1] == tok.cls_token_id) | (w[:, 1:-1] == tok.sep_token_id)).any()


def test_a_long_calibration_text_is_read_without_the_tokenizers_length_warning(tmp_path, capfd, caplog):
    """A calibration file is one long text: its stream is cut into windows, so the tokenizer's warning about
    sequences longer than the model's maximum would only mislead."""
    from weightsmith.eval import load_tokenizer
    from weightsmith.eval.metrics import tokenize
    from weightsmith.zoo import minilm_path

    tok = load_tokenizer(minilm_path())
    text = "the model reads this sentence again and again. " * 600
    (tmp_path / "calib.txt").write_text(text)
    from transformers.utils import logging as hf_logging

    level = hf_logging.get_verbosity()
    hf_logging.set_verbosity_warning()  # the suite silences transformers (conftest): let it speak here
    try:
        with caplog.at_level("WARNING"):
            windows = calibration_windows(tok, tmp_path / "calib.txt", seq_len=128, max_tokens=4096, causal=False)
            stream = tokenize(tok, [text])
    finally:
        hf_logging.set_verbosity(level)
    assert windows.shape == (4096 // 128, 128) and stream.numel() > tok.model_max_length
    said = capfd.readouterr().err + caplog.text
    assert "longer than the specified maximum" not in said
