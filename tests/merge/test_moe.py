"""weightsmith moe against mergekit-moe 0.1.5 on the same tiny Llama / Qwen2 stand-ins: every tensor and the
config bit-equal for every gate mode, the outputs load and generate in transformers, mergekit's own example
configs run, and the config refusals come before any output."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from weightsmith.errors import WeightsmithError
from weightsmith.merge.moe import build_moe
from weightsmith.merge.moe_router import route_prompts

from standins import finetune, qwen2, word_tokenizer

pytest.importorskip("mergekit")


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    from weightsmith.zoo.synthetic import random_llama

    root = tmp_path_factory.mktemp("moe")
    out = {"llama": random_llama(root / "llama", seed=0), "qwen": qwen2(root / "qwen")}
    for name in ("llama", "qwen"):
        word_tokenizer(out[name])
        for i in range(3):
            out[f"{name}{i}"] = finetune(out[name], root / f"{name}{i}", seed=10 + i)
    return out


def expert(path, *prompts, neg=(), **extra) -> dict:
    return {"source_model": str(path), "positive_prompts": list(prompts), **({"negative_prompts": list(neg)} if neg
                                                                             else {}), **extra}


def mixtral_config(m, mode: str) -> dict:
    return {"base_model": str(m["llama"]), "gate_mode": mode, "dtype": "float32", "experts": [
        expert(m["llama0"], "_tok_5 _tok_6 _tok_7", "_tok_9", neg=["_tok_50"]),
        expert(m["llama1"], "_tok_20 _tok_21", noise_scale=0.01, residual_scale=0.5),
        expert(m["llama2"], "_tok_30 _tok_31 _tok_32 _tok_33")]}


def qwen_config(m, mode: str, base: str = "qwen") -> dict:
    # the shared expert is the base: mergekit-moe 0.1.5 opens only the base and the experts, and fails on a
    # shared expert from any other model (weightsmith reads it; see the doc example below)
    return {"base_model": str(m[base]), "gate_mode": mode, "architecture": "qwen", "experts_per_token": 1,
            "experts": [expert(m[f"{base}0"], "_tok_5 _tok_6"), expert(m[f"{base}1"], "_tok_40", noise_scale=0.02)],
            "shared_experts": [expert(m[base], "_tok_70 _tok_71", residual_scale=0.1)]}


def _both(config: dict, tmp_path: Path, seed: int = 3) -> tuple[Path, Path]:
    """mergekit-moe's build and ours on one config, each after the same seed (random gates and expert noise
    draw from torch's global generator in both, in the same order)."""
    import yaml
    from mergekit.merge import MergeOptions
    from mergekit.moe.config import MoEMergeConfig
    from mergekit.scripts.moe import build

    path = tmp_path / "moe.yml"
    path.write_text(yaml.safe_dump(config))
    torch.manual_seed(seed)
    build(MoEMergeConfig.model_validate(config), str(tmp_path / "mk"), MergeOptions(), device="cpu")
    build_moe(path, tmp_path / "ws", device="cpu", seed=seed)
    return tmp_path / "mk", tmp_path / "ws"


def _fused_like_transformers(tensors: dict) -> dict:
    """mergekit writes Qwen2-MoE experts one tensor per projection; transformers 5 (and weightsmith) fuse them
    per layer: gate_up_proj = [gate; up] stacked over experts, down_proj stacked."""
    import re

    out, experts = {}, {}
    for name, t in tensors.items():
        m = re.fullmatch(r"(model\.layers\.\d+\.mlp)\.experts\.(\d+)\.(\w+)\.weight", name)
        if m:
            experts.setdefault(m[1], {}).setdefault(int(m[2]), {})[m[3]] = t
        else:
            out[name] = t
    for pre, by_index in experts.items():
        parts = [by_index[i] for i in sorted(by_index)]
        out[f"{pre}.experts.gate_up_proj"] = torch.stack([torch.cat([p["gate_proj"], p["up_proj"]]) for p in parts])
        out[f"{pre}.experts.down_proj"] = torch.stack([p["down_proj"] for p in parts])
    return out


def _same_model(mk: Path, ws: Path) -> None:
    ref, got = _fused_like_transformers(load_file(mk / "model.safetensors")), load_file(ws / "model.safetensors")
    assert set(got) == set(ref)
    for name, t in ref.items():
        assert got[name].dtype == t.dtype and torch.equal(got[name], t), name
    assert json.loads((ws / "config.json").read_text()) == json.loads((mk / "config.json").read_text())


@pytest.mark.parametrize("mode", ["hidden", "cheap_embed", "random", "uniform_random", "hidden_avg"])
def test_mixtral_bit_equal_to_mergekit_moe(mode, models, tmp_path):
    """Experts, attention, norms and routers bit-equal. Hidden / cheap_embed routers come out bit-equal too, not
    merely to float32 tolerance: the same bfloat16 forward through transformers and the same reductions in the
    same order; random gates and noise are the same draw given the same seed."""
    _same_model(*_both(mixtral_config(models, mode), tmp_path))


@pytest.mark.parametrize("mode, base", [("hidden", "qwen"), ("cheap_embed", "qwen"), ("random", "llama")])
def test_qwen2_moe_with_a_shared_expert_bit_equal_to_mergekit_moe(mode, base, models, tmp_path):
    """Includes a Llama base into Qwen2-MoE, where the missing q/k/v biases are written as zeros. The experts are
    compared fused, and transformers loads mergekit's unfused folder into the same parameters as ours."""
    from transformers import AutoModelForCausalLM

    mk, ws = _both(qwen_config(models, mode, base), tmp_path)
    _same_model(mk, ws)
    theirs, ours = (AutoModelForCausalLM.from_pretrained(p).state_dict() for p in (mk, ws))
    assert all(torch.equal(ours[k], t) for k, t in theirs.items()) and theirs.keys() == ours.keys()


def test_random_gates_follow_their_distributions(models, tmp_path):
    import yaml

    gates = {}
    for mode in ("random", "uniform_random"):
        cfg = {**mixtral_config(models, mode), "experts": [expert(models[f"llama{j % 3}"], f"_tok_{j}") for j in range(24)]}
        (tmp_path / f"{mode}.yml").write_text(yaml.safe_dump(cfg))
        build_moe(tmp_path / f"{mode}.yml", tmp_path / mode, seed=5, copy_tokenizer=False)
        t = load_file(tmp_path / mode / "model.safetensors")
        gates[mode] = torch.cat([t[f"model.layers.{i}.mlp.gate.weight"].flatten() for i in range(2)])
    assert gates["random"].mean().abs() < 0.1 and (gates["random"].std() - 1).abs() < 0.1
    bound = (1 / 32) ** 0.5  # nn.Linear's initialisation for 32 inputs
    assert gates["uniform_random"].abs().max() <= bound and gates["uniform_random"].abs().max() > 0.9 * bound


def test_outputs_load_and_generate_and_identical_experts_reproduce_the_base(models, tmp_path):
    """Every expert the base itself: the router's top-k weights sum to one, so the Mixtral is the dense base."""
    import yaml
    from transformers import AutoModelForCausalLM

    cfg = {**mixtral_config(models, "hidden"), "experts": [expert(models["llama"], f"_tok_{i}") for i in (5, 9, 30)]}
    (tmp_path / "same.yml").write_text(yaml.safe_dump(cfg))
    build_moe(tmp_path / "same.yml", tmp_path / "moe", allow_all_same=True)
    moe = AutoModelForCausalLM.from_pretrained(tmp_path / "moe").eval()
    dense = AutoModelForCausalLM.from_pretrained(models["llama"]).eval()
    ids = torch.randint(3, 128, (2, 12), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(moe(ids).logits, dense(ids).logits, atol=1e-5, rtol=1e-5)
    assert type(moe).__name__ == "MixtralForCausalLM"
    assert moe.generate(ids[:1, :4], max_new_tokens=5, do_sample=False).shape == (1, 9)
    (tmp_path / "qwen.yml").write_text(yaml.safe_dump(qwen_config(models, "hidden")))
    build_moe(tmp_path / "qwen.yml", tmp_path / "qmoe")
    qwen = AutoModelForCausalLM.from_pretrained(tmp_path / "qmoe").eval()
    assert type(qwen).__name__ == "Qwen2MoeForCausalLM"
    assert qwen.generate(ids[:1, :4], max_new_tokens=5, do_sample=False).shape == (1, 9)


DOC_EXAMPLES = {  # mergekit's docs/moe.md examples, hub names replaced by local stand-ins
    "sparse upcycling": """base_model: {llama}
gate_mode: random
dtype: bfloat16
experts:
""" + "".join("  - source_model: {llama}\n" for _ in range(8)),
    "clown car": """base_model: {llama}
gate_mode: hidden
dtype: bfloat16
experts:
  - source_model: {llama0}
    positive_prompts:
      - "<|im_start|>user\\nHello, who are you?<|im_end|>"
      - "<|im_start|>user\\nI need help with"
  - source_model: {llama1}
    positive_prompts:
      - "As a doctor of medicine,"
  - source_model: {llama2}
    positive_prompts:
      - "[Genres: Science Fiction]\\n[Tags: humor, old school, sci fi]"
      - "> get ye flask"
      - "[Mode: Interactive Storyteller]"
""",
    "qwen shared expert": """base_model: {qwen}
architecture: qwen
gate_mode: hidden
dtype: bfloat16
experts:
  - source_model: {qwen0}
    positive_prompts: ["_tok_5"]
  - source_model: {qwen1}
    positive_prompts: ["_tok_6"]
shared_experts:
  - source_model: {qwen2}
    positive_prompts: ["_tok_7"]
    residual_scale: 0.1
""",
}


@pytest.mark.parametrize("name", DOC_EXAMPLES)
def test_mergekit_doc_examples_run(name, models, tmp_path):
    from transformers import AutoModelForCausalLM

    (tmp_path / "c.yml").write_text(DOC_EXAMPLES[name].format(**{k: str(v) for k, v in models.items()}))
    info = build_moe(tmp_path / "c.yml", tmp_path / "out")
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "out")
    assert model.dtype == torch.bfloat16 and info["experts"] == model.config.to_dict().get(
        "num_local_experts", model.config.to_dict().get("num_experts"))


REFUSALS = [
    ({"gate_mod": "hidden"}, "unknown key 'gate_mod' (did you mean 'gate_mode'?)"),
    ({"gate_mode": "smart"}, "'gate_mode' is 'smart'; choose one of hidden"),
    ({"experts_per_token": 4}, "3 experts but experts_per_token is 4"),
    ({"architecture": "deepseek"}, "'DeepSeek MoE' is not supported"),
    ({"architecture": "qwen"}, "Qwen MoE: needs exactly one shared expert"),
    ({"shared_experts": "base", "architecture": "mixtral"}, "Mixtral: no shared experts"),
]


@pytest.mark.parametrize("change, message", REFUSALS)
def test_config_refusals_before_any_output(change, message, models, tmp_path):
    import yaml

    cfg = {**mixtral_config(models, "hidden"), **change}
    if "gate_mod" in change:
        del cfg["gate_mode"]
    if change.get("shared_experts") == "base":
        cfg["shared_experts"] = [expert(models["llama"], "_tok_3")]
    (tmp_path / "c.yml").write_text(yaml.safe_dump(cfg))
    with pytest.raises(WeightsmithError, match=message.replace("(", r"\(").replace(")", r"\)").replace("?", r"\?")):
        build_moe(tmp_path / "c.yml", tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_same_experts_need_the_training_flag(models, tmp_path):
    import yaml

    cfg = {**mixtral_config(models, "hidden"), "experts": [expert(models["llama0"], f"_tok_{i}") for i in (5, 6)]}
    (tmp_path / "c.yml").write_text(yaml.safe_dump(cfg))
    with pytest.raises(WeightsmithError, match="allow_all_same"):
        build_moe(tmp_path / "c.yml", tmp_path / "out")


def test_explain_reports_each_prompts_routing(models, tmp_path):
    import yaml

    (tmp_path / "c.yml").write_text(yaml.safe_dump(mixtral_config(models, "hidden")))
    build_moe(tmp_path / "c.yml", tmp_path / "moe")
    report = route_prompts(tmp_path / "moe", ["_tok_5 _tok_6 _tok_7", "_tok_30 _tok_31"], device="cpu")
    assert [r["prompt"] for r in report["prompts"]] == ["_tok_5 _tok_6 _tok_7", "_tok_30 _tok_31"]
    for row in report["prompts"]:
        assert len(row["shares"]) == 2 and all(len(s) == 3 for s in row["shares"])
        assert all(sum(s) == pytest.approx(2) for s in row["shares"])  # each token picks two distinct experts


def test_an_expert_given_as_base_plus_extracted_adapter(models, tmp_path, monkeypatch):
    """A model reference ``base+adapter`` as an expert: the full-rank adapter extract-lora takes from llama0
    rebuilds llama0's MLPs (to float32 SVD round-off)."""
    import yaml

    from weightsmith.compressor.lora_extract import extract_lora

    monkeypatch.setenv("WEIGHTSMITH_ADAPTERS_CACHE", str(tmp_path / "applied"))
    extract_lora(models["llama0"], tmp_path / "ad", base=models["llama"], max_rank=64)
    for name, first in (("plain", str(models["llama0"])), ("adapter", f"{models['llama']}+{tmp_path / 'ad'}")):
        cfg = mixtral_config(models, "cheap_embed")
        cfg["experts"][0]["source_model"] = first
        (tmp_path / f"{name}.yml").write_text(yaml.safe_dump(cfg))
        build_moe(tmp_path / f"{name}.yml", tmp_path / name, seed=1)
    plain = load_file(tmp_path / "plain" / "model.safetensors")
    rebuilt = load_file(tmp_path / "adapter" / "model.safetensors")
    for k, t in plain.items():
        torch.testing.assert_close(rebuilt[k], t, atol=1e-5, rtol=0, msg=k)
