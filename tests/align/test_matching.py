"""Planted permutations: B = A with every group permuted; both matchers must recover the permutations exactly."""
from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from models import ResNet, mlp
from weightsmith.errors import WeightsmithError
from weightsmith.merge.align import (activation_matching, apply_permutation, identity_perms, invert, permute_module,
                                     random_perms, spec_for, weight_matching)
from weightsmith.merge.pleas import pleas_modules


def _randomise_norms(model: nn.Module) -> nn.Module:
    for mod in model.modules():
        if isinstance(mod, nn.BatchNorm2d):
            mod.running_mean.normal_(0, 0.1)
            mod.running_var.uniform_(0.5, 2)
            mod.weight.data.uniform_(0.5, 1.5)
            mod.bias.data.normal_(0, 0.1)
        elif type(mod).__name__.endswith("RMSNorm"):
            mod.weight.data.uniform_(0.5, 1.5)
    return model.eval()


def _llama(**cfg) -> nn.Module:
    from transformers import LlamaForCausalLM

    from weightsmith.zoo.synthetic import llama_config

    torch.manual_seed(0)
    return _randomise_norms(LlamaForCausalLM(llama_config(**cfg)))


CASES = {
    "mlp": (lambda: mlp((16, 32, 24, 5)).eval(), lambda: torch.randn(64, 16)),
    "resnet": (lambda: _randomise_norms(ResNet(width=4, classes=3)), lambda: torch.randn(16, 1, 8, 8)),
    "llama": (lambda: _llama(), lambda: torch.randint(0, 128, (4, 16))),
    "llama-gqa": (lambda: _llama(num_key_value_heads=2), lambda: torch.randint(0, 128, (4, 16))),
    "llama-tied": (lambda: _llama(tie_word_embeddings=True), lambda: torch.randint(0, 128, (4, 16))),
}


def _out(model, x):
    out = model(x)
    return out.logits if hasattr(out, "logits") else out


def _same_state(a: nn.Module, b: nn.Module) -> bool:
    sb = b.state_dict()
    return all(torch.equal(v, sb[k]) for k, v in a.state_dict().items())


@pytest.mark.parametrize("case", list(CASES))
def test_planted_permutations_are_recovered_by_both_matchers(case):
    make, data = CASES[case]
    a = make()
    spec = spec_for(a)
    planted = random_perms(spec, seed=1)
    assert any(not torch.equal(p, torch.arange(len(p))) for p in planted.values())
    b = permute_module(copy.deepcopy(a), spec, planted)
    x = data()
    assert torch.allclose(_out(a, x), _out(b, x), atol=1e-5)  # a permutation never changes the function
    assert not _same_state(a, b)

    wm = weight_matching(spec, a.state_dict(), b.state_dict())
    am = activation_matching(a, b, spec, [data(), data()])
    for found in (wm, am):
        aligned = copy.deepcopy(b)
        aligned.load_state_dict(apply_permutation(b.state_dict(), spec, found))
        assert _same_state(a, aligned)
        merged, _ = pleas_modules(a, aligned, [data()], width=1.0, perms=identity_perms(spec), least_squares=False)
        if case != "resnet":  # BatchNorm statistics are re-estimated on the calibration batch there
            assert _same_state(a, merged)
        else:
            assert torch.allclose(merged.stem.weight, a.stem.weight)


def test_correlation_metric_recovers_a_planted_permutation():
    a = mlp((16, 32, 24, 5)).eval()
    spec = spec_for(a)
    planted = random_perms(spec, seed=3)
    b = permute_module(copy.deepcopy(a), spec, planted)
    found = activation_matching(a, b, spec, [torch.randn(128, 16)], metric="correlation")
    # B's unit planted[i] is A's unit i, so the alignment is the inverse permutation
    assert all(torch.equal(found[g], invert(planted[g])) for g in spec.groups)


def test_residual_adds_tie_channels_into_one_group():
    spec = spec_for(ResNet(width=4))
    # stem, layer1 blocks' second convs and their adds carry one residual stream; layer2 another.
    groups = {lay.module: lay.out_group for lay in spec.layers}
    assert groups["stem"] == groups["layer1.0.conv2"] == groups["layer1.1.conv2"]
    assert groups["layer2.0.conv2"] == groups["layer2.0.shortcut.0"] == groups["layer2.1.conv2"]
    assert groups["stem"] != groups["layer2.0.conv2"]
    assert spec.axes["layer1.0.bn2.running_var"][0].group == groups["stem"]
    assert groups["fc"] is None  # class logits are never permuted


def test_llama_spec_covers_heads_residual_and_mlp():
    spec = spec_for(_llama(num_key_value_heads=2))
    assert spec.groups["residual"].size == 32
    assert spec.groups["model.layers.0.heads"].size == 2  # kv heads; 2 query heads ride on each
    q = spec.axes["model.layers.0.self_attn.q_proj.weight"]
    k = spec.axes["model.layers.0.self_attn.k_proj.weight"]
    assert (q[0].block, k[0].block) == (16, 8)
    assert spec.axes["model.embed_tokens.weight"][0].dim == 1
    assert spec.axes["lm_head.weight"] == [spec.axes["lm_head.weight"][0]] and spec.axes["lm_head.weight"][0].dim == 1


@pytest.mark.parametrize("model, message", [
    (nn.Sequential(nn.Linear(4, 8), nn.Softmax(dim=-1), nn.Linear(8, 2)), "Softmax"),
    (nn.Sequential(nn.Conv2d(1, 4, 3), nn.Flatten(), nn.Linear(4 * 36, 2)), "flatten"),
    (nn.Sequential(nn.Conv2d(2, 4, 3, groups=2), nn.ReLU()), "grouped"),
])
def test_unsupported_layers_are_refused_clearly(model, message):
    with pytest.raises(WeightsmithError, match=message):
        spec_for(model)


def test_other_transformers_are_refused(tmp_path):
    from weightsmith import load
    from weightsmith.zoo.synthetic import random_gpt2

    with pytest.raises(WeightsmithError, match="model_type 'gpt2'"):
        spec_for(load(random_gpt2(tmp_path / "g")))
