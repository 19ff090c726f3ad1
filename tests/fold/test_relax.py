"""The relaxation of shared blocks (per-block low-rank weight residuals and bias residuals): exact at full rank,
saved, reloaded and exported as the same function."""
import json

import pytest
import torch
from transformers import BertConfig, BertModel

import weightsmith
from weightsmith.fold.format import RelaxedLinear, export_plain, save
from weightsmith.fold.plan import fold_model

HIDDEN, INTER = 32, 64


@pytest.fixture(scope="module")
def bert():
    """A small random BERT encoder (biases in every linear layer), four blocks."""
    torch.manual_seed(0)
    cfg = BertConfig(vocab_size=200, hidden_size=HIDDEN, intermediate_size=INTER, num_hidden_layers=4,
                     num_attention_heads=4, max_position_embeddings=64)
    model = BertModel(cfg).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.05)  # distinct biases and weights in every block
    return model, {**cfg.to_dict(), "architectures": ["BertModel"]}


def hidden(model, x):
    with torch.no_grad():
        return model(input_ids=x).last_hidden_state


def test_full_rank_relaxation_gives_back_every_shared_block(bert):
    model, cfg = bert
    x = torch.randint(0, 200, (2, 12))
    unshared = fold_model(model, cfg, removed=[1], sizes=[1, 1, 1])
    exact = fold_model(model, cfg, removed=[1], sizes=[3], share_init="first", relax_rank=INTER)
    low = fold_model(model, cfg, removed=[1], sizes=[3], share_init="first", relax_rank=2)
    shared = fold_model(model, cfg, removed=[1], sizes=[3], share_init="first")
    want = hidden(unshared, x)
    assert torch.allclose(hidden(exact, x), want, atol=1e-4)
    assert not torch.allclose(hidden(shared, x), want, atol=1e-2)
    # the bias residual alone: at rank 2 every block still carries its own bias
    layer = exact.encoder.layer[2].attention.self.query
    assert isinstance(layer, RelaxedLinear) and layer.bias is exact.encoder.layer[0].attention.self.query.bias
    own = model.encoder.layer[3].attention.self.query.bias
    got = low.encoder.layer[2].attention.self.query
    assert torch.allclose(got.bias + got.lora_bias, own, atol=1e-6)


def test_relaxed_fold_saves_reloads_and_exports_as_the_same_function(bert, tmp_path):
    model, cfg = bert
    x = torch.randint(0, 200, (2, 12))
    folded = fold_model(model, cfg, removed=[1], sizes=[3], share_init="first", relax_rank=3)
    (tmp_path / "f").mkdir()
    save(folded, tmp_path / "f", folded.config.to_dict() | {"weightsmith": folded.config.weightsmith})
    stored = json.loads((tmp_path / "f" / "config.json").read_text())
    assert stored["weightsmith"]["relax_rank"] == 3
    reloaded = weightsmith.load(tmp_path / "f")
    assert torch.allclose(hidden(reloaded, x), hidden(folded, x), atol=1e-6)
    export_plain(tmp_path / "f", tmp_path / "plain")
    plain = BertModel.from_pretrained(tmp_path / "plain").eval()
    assert torch.allclose(hidden(plain, x), hidden(folded, x), atol=1e-5)


def test_a_relaxed_folder_without_bias_residuals_loads_with_them_zero(bert):
    """Relaxed folders written before the bias residual existed hold only lora_A/lora_B."""
    from weightsmith.fold.format import assemble, unique_state

    model, cfg = bert
    x = torch.randint(0, 200, (2, 12))
    folded = fold_model(model, cfg, removed=[1], sizes=[3], share_init="first", relax_rank=3)
    config = folded.config.to_dict() | {"weightsmith": folded.config.weightsmith}
    older = assemble(config, {k: v for k, v in unique_state(folded).items() if not k.endswith("lora_bias")})
    with torch.no_grad():
        for mod in folded.modules():
            if isinstance(mod, RelaxedLinear):
                mod.lora_bias.zero_()
    assert torch.allclose(hidden(older, x), hidden(folded, x), atol=1e-6)
