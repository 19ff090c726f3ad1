"""Measured importance (--importance loss): the probe's loss with blocks taken out equals the loss of the
model actually folded without them (LM and encoder), a planted identity block costs exactly nothing and is
chosen, and the multi-block search is at least as good as every span and the greedy choice."""
import copy

import pytest
import torch
import torch.nn.functional as F

import weightsmith
from weightsmith.checkpoint import read_json
from weightsmith.eval import load_tokenizer
from weightsmith.data import calibration_windows
from weightsmith.fold.plan import fold_model
from weightsmith.pooling import read_pooling
from weightsmith.fold.removal import RemovalProbe, loss_importance


def lm_windows(zoo, max_tokens=1024):
    return calibration_windows(load_tokenizer(zoo.model("base")), zoo.data("general", "calib"), seq_len=64,
                               max_tokens=max_tokens, causal=True)


def test_probe_loss_equals_the_loss_of_the_folded_lm(zoo):
    model = weightsmith.load(zoo.model("base"))
    cfg = read_json(zoo.model("base") / "config.json", "config")
    windows = lm_windows(zoo)
    probe = RemovalProbe(model, windows, batch_size=4)
    for removed in ([0], [2], [3], [1, 2], [0, 3]):
        folded = fold_model(model, cfg, removed, [1] * (4 - len(removed)))
        batches = windows[::2 if len(removed) > 1 else 1].split(4)  # sets of 2+ are ranked on every other window
        with torch.no_grad():
            direct = sum(folded(input_ids=b, labels=b).loss.item() * b.shape[0] for b in batches) / sum(map(len, batches))
        assert probe.loss(removed) == pytest.approx(direct, rel=1e-5)
    with torch.no_grad():
        assert probe.loss([]) == pytest.approx(
            sum(model(input_ids=b, labels=b).loss.item() * b.shape[0] for b in windows.split(4)) / len(windows), rel=1e-6)
    x = windows[:2]
    with torch.no_grad():  # the model is untouched afterwards
        assert torch.equal(model(input_ids=x).logits, weightsmith.load(zoo.model("base"))(input_ids=x).logits)


def test_probe_distance_equals_the_pooled_distance_of_the_folded_encoder(zoo):
    from weightsmith.zoo import minilm_path

    path = minilm_path()
    model = weightsmith.load(path)
    pooling = read_pooling(path)
    windows = calibration_windows(load_tokenizer(path), zoo.data("prose", "calib"), seq_len=32, max_tokens=256,
                                  causal=False)
    probe = RemovalProbe(model, windows, batch_size=4, pooling=pooling)
    cfg = read_json(path / "config.json", "config")
    with torch.no_grad():
        ref = pooling(model(input_ids=windows).last_hidden_state)
        for removed in ([1], [4, 5], [0]):
            folded = fold_model(model, cfg, removed, [1] * (6 - len(removed)))
            got = pooling(folded(input_ids=windows).last_hidden_state)
            dist = 1 - F.cosine_similarity(got, ref, dim=-1)
            if len(removed) > 1:  # sets of 2+ are ranked on every other window
                dist = dist[::2]
            assert probe.loss(removed) == pytest.approx(dist.mean().item(), rel=1e-4, abs=1e-6)
    assert probe.loss([]) == 0.0


def planted(zoo, at: list[int]):
    model = weightsmith.load(zoo.model("base"))
    for pos in at:
        block = copy.deepcopy(model.model.layers[0])
        with torch.no_grad():
            block.self_attn.o_proj.weight.zero_()
            block.mlp.down_proj.weight.zero_()
        model.model.layers.insert(pos, block)
    model.config.num_hidden_layers = len(model.model.layers)
    return model


@pytest.mark.parametrize("at", [[1], [3], [1, 4]])
def test_loss_importance_finds_planted_identity_blocks(zoo, at):
    model = planted(zoo, at)
    removed, scores = loss_importance(model, lm_windows(zoo), len(at), batch_size=4)
    assert removed == at
    assert scores["loss_removed"] == pytest.approx(scores["loss_base"], abs=1e-6)
    others = [v for i, v in enumerate(scores["loss_without_block"]) if i not in at]
    assert min(others) > scores["loss_base"] + 0.01


def test_multi_block_choice_is_no_worse_than_any_span_or_the_greedy_pick(zoo):
    model = weightsmith.load(zoo.model("base"))
    probe = RemovalProbe(model, lm_windows(zoo), batch_size=4)
    chosen, scores = probe.choose(2, beam=2)
    spans = [probe.loss({l, l + 1}) for l in range(3)]
    first = min(range(4), key=lambda i: probe.loss({i}))
    greedy = min(probe.loss({first, j}) for j in range(4) if j != first)
    assert scores["loss_removed"] == pytest.approx(probe.loss(chosen, every=1))  # reported on all batches
    assert probe.loss(chosen) <= min(spans + [greedy]) + 1e-9  # ranked on every other window, as the candidates


def test_sets_are_ranked_on_the_same_windows_whatever_the_batch_size(zoo):
    model = weightsmith.load(zoo.model("base"))
    windows = lm_windows(zoo)
    a, b = RemovalProbe(model, windows, batch_size=4), RemovalProbe(model, windows, batch_size=3)
    for removed in ([1, 2], [0, 3]):
        assert a.loss(removed) == pytest.approx(b.loss(removed), rel=1e-5)
    assert a.loss([1, 2]) != pytest.approx(a.loss([1, 2], every=1), rel=1e-4)  # a strict subset of the windows
