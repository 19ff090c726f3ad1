from __future__ import annotations

import pytest

from weightsmith.checkpoint import Checkpoint, detect_layout
from weightsmith.errors import WeightsmithError
from weightsmith.zoo.synthetic import random_bert, random_gpt2


def test_llama_layout(tiny_llama):
    ckpt = Checkpoint(tiny_llama(num_hidden_layers=3))
    lay = detect_layout(ckpt.config, ckpt.names())
    assert (lay.block_prefix, lay.num_blocks) == ("model.layers.", 3)
    assert lay.embeddings == ["model.embed_tokens.weight"] and lay.head == ["lm_head.weight"]
    assert lay.final_norm == ["model.norm.weight"]
    assert lay.kind("model.layers.2.input_layernorm.weight") == "norm"
    assert lay.kind("model.layers.2.mlp.up_proj.weight") == "block"
    assert lay.block_of("model.layers.2.mlp.up_proj.weight") == 2
    assert lay.block_key("model.layers.2.mlp.up_proj.weight") == "mlp.up_proj.weight"


def test_gpt2_and_bert_layouts(tmp_path):
    g = Checkpoint(random_gpt2(tmp_path / "g", n_layer=3))
    lay = detect_layout(g.config, g.names())
    assert lay.block_prefix == "transformer.h." and lay.num_blocks == 3
    assert set(lay.embeddings) == {"transformer.wte.weight", "transformer.wpe.weight"}
    assert lay.kind("transformer.h.1.ln_1.weight") == "norm"
    b = Checkpoint(random_bert(tmp_path / "b", classes=3))
    lay = detect_layout(b.config, b.names())
    assert lay.block_prefix == "bert.encoder.layer." and lay.num_blocks == 2
    assert "classifier.weight" in lay.head
    assert lay.kind("bert.encoder.layer.0.attention.output.LayerNorm.weight") == "norm"


def test_minilm_layout():
    from weightsmith.zoo import minilm_path

    ckpt = Checkpoint(minilm_path())
    lay = detect_layout(ckpt.config, ckpt.names())
    assert lay.num_blocks == 6 and lay.block_prefix in ("encoder.layer.", "bert.encoder.layer.")


def test_unknown_and_inconsistent_layouts(tiny_llama):
    ckpt = Checkpoint(tiny_llama())
    with pytest.raises(WeightsmithError, match="model_type 'mamba' has no known block layout"):
        detect_layout({**ckpt.config, "model_type": "mamba"}, ckpt.names())
    with pytest.raises(WeightsmithError, match="config says 5 layers"):
        detect_layout({**ckpt.config, "num_hidden_layers": 5}, ckpt.names())
    with pytest.raises(WeightsmithError, match="config.json is missing"):
        detect_layout(None, ckpt.names())
