"""Fold: exactness of the identity fold, folded vs exported plain logits and generate(), real sharing,
parameter counts, gates finding a planted identity block, bad input."""
import json

import pytest
import torch
import transformers

import weightsmith
from weightsmith.checkpoint import Checkpoint, read_json
from weightsmith.errors import InvalidChoice, OptionError, OutOfRange, WeightsmithError
from weightsmith.eval import count_params
from weightsmith.fold import fold
from weightsmith.fold.format import describe, export_plain
from weightsmith.fold.gates import gate_importance, lowest
from weightsmith.fold.plan import fold_model, parse_share


def logits(model, x):
    with torch.no_grad():
        return model(input_ids=x).logits


def test_removing_nothing_with_group_size_one_reproduces_logits_exactly(zoo, tmp_path):
    base = zoo.model("base")
    fold(base, tmp_path / "f", data=zoo.data("general", "calib"), remove=0.0, share="1", device="cpu", max_tokens=512)
    x = torch.randint(0, 1000, (2, 40))
    assert torch.equal(logits(weightsmith.load(tmp_path / "f"), x), logits(weightsmith.load(base), x))


@pytest.mark.parametrize("relax_rank", [0, 4])
def test_exported_plain_checkpoint_gives_the_folded_logits_and_generate(zoo, tmp_path, relax_rank):
    out = tmp_path / "f"
    res = fold(zoo.model("base"), out, data=zoo.data("general", "calib"), remove=0.25, share="2",
               importance="bi", relax_rank=relax_rank, heal_steps=3, device="cpu", max_tokens=1024)
    folded = weightsmith.load(out)
    blocks = folded.model.layers
    assert len(blocks) == 3 and res["groups"] == [[0, 1], [2]]
    assert blocks[0].mlp.down_proj.weight is blocks[1].mlp.down_proj.weight  # one Parameter object
    assert blocks[0].input_layernorm.weight is not blocks[1].input_layernorm.weight
    assert [b.self_attn.layer_idx for b in blocks] == [0, 1, 2]  # own KV-cache slot per depth
    export_plain(out, tmp_path / "plain")
    plain = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "plain").eval()
    assert "weightsmith" not in read_json(tmp_path / "plain" / "config.json", "config")
    assert plain.config.num_hidden_layers == 3
    x = torch.randint(0, 1000, (2, 40))
    if relax_rank:
        assert torch.allclose(logits(plain, x), logits(folded, x), atol=1e-4)
    else:
        assert torch.equal(logits(plain, x), logits(folded, x))
    prompt = torch.randint(0, 1000, (1, 6))
    gen = folded.generate(prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=12, do_sample=False)
    assert gen.shape == (1, 18)
    assert torch.equal(gen, plain.generate(prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=12,
                                           do_sample=False))
    ids = prompt  # greedy without the cache: the cache must not mix depths
    for _ in range(12):
        ids = torch.cat([ids, logits(folded, ids)[:, -1:].argmax(-1)], 1)
    assert torch.equal(gen, ids)


def test_shared_weights_are_counted_and_stored_once(zoo, tmp_path):
    base = weightsmith.load(zoo.model("base"))
    cfg = read_json(zoo.model("base") / "config.json", "config")
    folded = fold_model(base, cfg, removed=[], sizes=[2, 2])
    block = base.model.layers[0]
    per_block = sum(p.numel() for p in block.parameters())
    norms = block.input_layernorm.weight.numel() + block.post_attention_layernorm.weight.numel()
    assert count_params(folded) == count_params(base) - 2 * (per_block - norms)
    out = tmp_path / "f"
    from weightsmith.fold.format import folded_config, save
    out.mkdir()
    save(folded, out, folded_config(cfg, [0, 1, 2, 3], folded.config.weightsmith))
    info = describe(Checkpoint(out))
    assert info["unique_params"] == count_params(folded)
    assert info["total_params"] == count_params(base)
    # average init: the shared weight is the mean of the two originals
    mean = (base.model.layers[2].mlp.up_proj.weight + base.model.layers[3].mlp.up_proj.weight) / 2
    assert torch.allclose(folded.model.layers[3].mlp.up_proj.weight, mean)


@pytest.mark.parametrize("relax_rank", [0, 2])
def test_lora_adapters_are_shared_with_the_weight_and_merge_back_exactly(zoo, relax_rank):
    from weightsmith.fold.heal import add_lora, merge_lora

    base = weightsmith.load(zoo.model("base"))
    cfg = read_json(zoo.model("base") / "config.json", "config")
    folded = fold_model(base, cfg, removed=[1], sizes=[2, 1], relax_rank=relax_rank)
    before = count_params(folded)
    params = add_lora(folded, rank=4)
    blocks = folded.model.layers
    a, b = blocks[0].mlp.up_proj, blocks[1].mlp.up_proj
    assert a.lora_A["default"].weight is b.lora_A["default"].weight  # one adapter for the shared weight
    assert a.lora_A["default"].weight is not blocks[2].mlp.up_proj.lora_A["default"].weight
    linears = sum(1 for name, m in base.model.layers[0].named_modules() if isinstance(m, torch.nn.Linear))
    assert len(params) == 2 * 2 * linears  # A and B for each linear of the two weight groups
    torch.manual_seed(0)
    for p in params:
        torch.nn.init.normal_(p, std=0.05)
    x = torch.randint(0, 1000, (2, 24))
    with_adapters = logits(folded, x)
    assert not torch.allclose(with_adapters, logits(base, x), atol=1e-3)
    assert merge_lora(folded) == 2 * linears
    assert torch.allclose(logits(folded, x), with_adapters, atol=1e-5)
    assert blocks[0].mlp.up_proj.weight is blocks[1].mlp.up_proj.weight and count_params(folded) == before
    assert not any("lora_A.default" in n for n, _ in folded.named_parameters())


def test_fold_heals_with_lora_and_keeps_the_sharing(zoo, tmp_path):
    res = fold(zoo.model("base"), tmp_path / "f", data=zoo.data("general", "calib"), remove=0.25, share="2",
               importance="bi", heal_steps=3, heal_lora=4, device="cpu", max_tokens=1024)
    unhealed = fold(zoo.model("base"), tmp_path / "g", data=zoo.data("general", "calib"), remove=0.25, share="2",
                    importance="bi", device="cpu", max_tokens=1024)
    assert res["heal_lora_rank"] == 4 and res["params_unique"] == unhealed["params_unique"]
    healed, plain = weightsmith.load(tmp_path / "f"), weightsmith.load(tmp_path / "g")
    assert healed.model.layers[0].mlp.up_proj.weight is healed.model.layers[1].mlp.up_proj.weight
    x = torch.randint(0, 1000, (2, 24))
    assert not torch.equal(logits(healed, x), logits(plain, x))
    with pytest.raises(OutOfRange, match=r"^heal_lora: -1 is out of range"):
        fold(zoo.model("base"), tmp_path / "h", data=zoo.data("general", "calib"), heal_lora=-1, device="cpu")


def test_gates_pick_a_planted_identity_block_first(zoo):
    """A copy of block 0 with its residual branches zeroed, inserted in front: the model computes the same
    function, so its gate is the one the loss does not defend."""
    import copy

    model = weightsmith.load(zoo.model("base"))
    planted = copy.deepcopy(model.model.layers[0])
    with torch.no_grad():
        planted.self_attn.o_proj.weight.zero_()
        planted.mlp.down_proj.weight.zero_()
    model.model.layers.insert(1, planted)
    model.config.num_hidden_layers = 5
    from weightsmith.eval import load_tokenizer
    from weightsmith.data import calibration_windows

    windows = calibration_windows(load_tokenizer(zoo.model("base")), zoo.data("general", "calib"), seq_len=64,
                                  max_tokens=2048, causal=True)
    gates = gate_importance(model, windows, keep=4, steps=60, batch_size=4)
    assert lowest(gates, 1) == [1]
    assert gates[1] < min(gates[:1] + gates[2:]) - 0.05
    assert all(p.requires_grad for p in model.parameters())  # base weights unfrozen again


def test_bert_fold_exports_plain_with_identical_outputs(tmp_path, zoo):
    from weightsmith.zoo.synthetic import random_bert
    from weightsmith.zoo import minilm_path

    src = random_bert(tmp_path / "bert", vocab_size=30522, num_hidden_layers=4)
    for f in ("vocab.txt", "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
        (src / f).write_bytes((minilm_path() / f).read_bytes())
    fold(src, tmp_path / "f", data=zoo.data("prose", "calib"), remove=0.25, share="3", importance="angular",
         device="cpu", max_tokens=1024)
    folded = weightsmith.load(tmp_path / "f")
    export_plain(tmp_path / "f", tmp_path / "p")
    plain = transformers.AutoModel.from_pretrained(tmp_path / "p").eval()
    x = torch.randint(0, 30522, (2, 16))
    with torch.no_grad():
        assert torch.equal(folded(input_ids=x).last_hidden_state, plain(input_ids=x).last_hidden_state)
    assert count_params(folded) < count_params(plain)


def test_bad_fold_options_are_refused(zoo, tmp_path):
    assert parse_share("2", 5) == [2, 2, 1] and parse_share("1,2", 3) == [1, 2]
    with pytest.raises(WeightsmithError, match="sums to"):
        parse_share("2,2", 3)
    with pytest.raises(OptionError, match="^share: 'two' must be a group size"):
        parse_share("two", 3)
    base, data = zoo.model("base"), zoo.data("general", "calib")
    with pytest.raises(OutOfRange, match=r"^remove: 1.0 is out of range; it must be in \[0, 1\)$"):
        fold(base, tmp_path / "o", data=data, remove=1.0)
    with pytest.raises(InvalidChoice, match="^importance: 'random' is not one of loss, gates, bi, angular$"):
        fold(base, tmp_path / "o", data=data, importance="random")
    with pytest.raises(WeightsmithError, match="inside|input"):
        fold(base, base / "sub", data=data)
    assert not (tmp_path / "o").exists()


def test_fold_cli_json_then_inspect_and_export(zoo, tmp_path):
    from typer.testing import CliRunner

    from weightsmith.cli import app

    runner = CliRunner()
    out = tmp_path / "folded"
    res = runner.invoke(app, ["fold", str(zoo.model("base")), "-o", str(out), "--data", str(zoo.data("general", "calib")),
                              "--remove", "0.25", "--share", "2", "--gate-steps", "5", "--max-tokens", "1024",
                              "--device", "cpu", "--json"])
    assert res.exit_code == 0, res.output
    info = json.loads(res.output)
    assert len(info["removed"]) == 1 and info["params_unique"] < info["params_original"]
    assert (out / "README.md").exists()
    res = runner.invoke(app, ["inspect", str(out), "--json"])
    assert res.exit_code == 0, res.output
    assert json.loads(res.output)["unique_params"] == info["params_unique"]
    res = runner.invoke(app, ["export", str(out), "--plain", "-o", str(tmp_path / "plain")])
    assert res.exit_code == 0, res.output
    assert Checkpoint(tmp_path / "plain").num_params == json.loads(runner.invoke(app, ["inspect", str(out), "--json"]).output)["total_params"]


def test_heal_trains_on_its_own_token_budget(zoo, tmp_path, monkeypatch):
    """--max-tokens sizes the importance's calibration, --heal-max-tokens the heal's training data: token
    windows for a causal LM, one padded input per line for an encoder."""
    from weightsmith.data import Sentences
    from weightsmith.zoo import minilm_path

    seen = []
    monkeypatch.setattr("weightsmith.fold.heal.heal", lambda student, teacher, data, **kw: seen.append(data) or {})
    base, calib = zoo.model("base"), zoo.data("general", "calib")
    common = dict(remove=0.25, importance="bi", heal_steps=1, seq_len=64, max_tokens=512, device="cpu")
    fold(base, tmp_path / "a", data=calib, **common)
    fold(base, tmp_path / "b", data=calib, heal_max_tokens=2048, **common)
    assert [tuple(d.shape) for d in seen] == [(8, 64), (32, 64)]
    lines = tmp_path / "lines.txt"
    lines.write_text("\n".join(f"sentence number {i} of the calibration file." for i in range(200)))
    fold(minilm_path(), tmp_path / "c", data=lines, heal_max_tokens=100, **{**common, "remove": 0.17})
    assert isinstance(seen[-1], Sentences) and sum(map(len, seen[-1].ids)) >= 100 > sum(map(len, seen[-1].ids[:-1]))
    with pytest.raises(OutOfRange, match=r"^heal_max_tokens: 0 is out of range"):
        fold(base, tmp_path / "d", data=calib, heal_max_tokens=0, **common)
