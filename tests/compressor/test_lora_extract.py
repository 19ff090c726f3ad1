"""extract-lora against mergekit-extract-lora 0.1.5 on the same tiny inputs, peft loading the adapter, and the
rank rules on planted low-rank deltas."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from weightsmith.compressor.lora_extract import decompose, energy_rank, extract_lora
from weightsmith.errors import WeightsmithError
from weightsmith.stage_options import ExtractLoraOptions

from standins import finetune, qwen2, word_tokenizer

pytest.importorskip("mergekit")


@pytest.fixture
def pair(tiny_llama, tmp_path):
    base = tiny_llama("base")
    return base, finetune(base, tmp_path / "ft")


def _mergekit(ft: Path, base: Path, out: Path, *args: str) -> Path:
    from mergekit.scripts.extract_lora import main

    main.main(["--model", str(ft), "--base-model", str(base), "--out-path", str(out), *args], standalone_mode=False)
    return out


def _deltas(folder: Path) -> tuple[dict, dict, dict]:
    """Per module B·A (transposed back for embeddings), the full-rank tensors, and the config."""
    t = load_file(folder / "adapter_model.safetensors")
    lora, full = {}, {}
    for k, v in t.items():
        if ".lora_A." in k or k.endswith("lora_embedding_A"):
            emb = k.endswith("lora_embedding_A")
            b = t[k.replace("_A", "_B")]
            lora[k.rsplit(".lora", 1)[0]] = (b.float() @ v.float()).T if emb else b.float() @ v.float()
        elif ".lora_B." not in k and not k.endswith("lora_embedding_B"):
            full[k] = v
    return lora, full, json.loads((folder / "adapter_config.json").read_text())


CASES = {
    "defaults": ([], {}),
    "embed_unscaled_eps": (["--embed-lora", "--no-distribute-scale", "--sv-epsilon", "0.05", "--max-rank", "4"],
                           dict(embed_lora=True, distribute_scale=False, sv_epsilon=0.05, max_rank=4)),
    # mergekit 0.1.5 crashes on --save-module unless nothing else joins modules_to_save (embeddings, norms)
    "regex_save_skip": (["-i", "layers", "-e", r"layers\.1\.mlp", "--save-module", "o_proj", "--skip-undecomposable",
                         "--embed-lora", "--max-rank", "40"],
                        dict(include_regex=["layers"], exclude_regex=[r"layers\.1\.mlp"], save_module=["o_proj"],
                             skip_undecomposable=True, embed_lora=True, max_rank=40)),
}


@pytest.mark.parametrize("case", CASES)
@pytest.mark.parametrize("arch", ["llama", "qwen2"])
def test_same_adapter_as_mergekit_extract_lora(case, arch, pair, tmp_path):
    """Same module set, ranks and config; B·A equal to float32 SVD round-off (1e-5 of the delta's scale: two
    LAPACK calls on the same float32 matrix agree to ~1e-6 relative, singular vector signs aside, which B·A
    cancels); full-rank modules bit-equal."""
    base, ft = pair if arch == "llama" else (b := qwen2(tmp_path / "qbase"), finetune(b, tmp_path / "qft"))
    mk_args, ours = CASES[case]
    ref = _deltas(_mergekit(ft, base, tmp_path / "mk", *mk_args))
    extract_lora(ft, tmp_path / "ws", base=base, **ours)
    got = _deltas(tmp_path / "ws")
    assert set(got[0]) == set(ref[0]) and set(got[1]) == set(ref[1])
    for name, ba in ref[0].items():
        torch.testing.assert_close(got[0][name], ba, atol=1e-5 * ba.abs().max().item(), rtol=0)
    for name, t in ref[1].items():
        assert torch.equal(got[1][name], t), name
    ignore = {"target_modules", "modules_to_save", "lora_bias", "base_model_name_or_path"}
    assert {k: v for k, v in got[2].items() if k not in ignore} == {k: v for k, v in ref[2].items() if k not in ignore}
    assert set(got[2]["target_modules"]) == set(ref[2]["target_modules"])
    assert set(got[2]["modules_to_save"]) == set(ref[2]["modules_to_save"])


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
def test_peft_loads_the_adapter_and_merges_to_base_plus_ba(arch, pair, tmp_path):
    """merge_and_unload gives base + B·A on every decomposed weight and the fine-tune's own tensor on full-rank
    modules: at full rank that is the fine-tune itself, but for Qwen2's q/k/v bias deltas, which the adapter
    stores as mergekit does (lora_B.bias) and PEFT leaves out unless every target module has a bias."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    base, ft = pair if arch == "llama" else (b := qwen2(tmp_path / "qbase"), finetune(b, tmp_path / "qft"))
    extract_lora(ft, tmp_path / "ad", base=base, max_rank=64)
    merged = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base), str(tmp_path / "ad"))
    merged = merged.merge_and_unload().state_dict()
    want = AutoModelForCausalLM.from_pretrained(ft).state_dict()
    assert set(merged) == set(want)
    before = AutoModelForCausalLM.from_pretrained(base).state_dict()
    for name, t in want.items():
        expect = before[name] if name.endswith("proj.bias") else t
        torch.testing.assert_close(merged[name], expect, atol=2e-5, rtol=0, msg=name)


def test_rank_auto_finds_planted_ranks(tiny_llama, tmp_path):
    base = tiny_llama("base")
    ft = finetune(base, tmp_path / "ft", rank=3)
    info = extract_lora(ft, tmp_path / "ad", base=base, rank="auto", energy=0.999999)
    assert set(info["ranks"].values()) == {3}
    cfg = json.loads((tmp_path / "ad" / "adapter_config.json").read_text())
    assert cfg["r"] == 3 and cfg["rank_pattern"] == {}


def test_energy_rank_closed_form():
    s = torch.tensor([3.0, 2.0, 1.0, 0.0])  # energies 9, 4, 1 of 14
    assert [energy_rank(s, 14.0, e) for e in (0.5, 9 / 14, 0.9, 13 / 14, 1.0)] == [1, 1, 2, 2, 3]


def _spectrum(values: torch.Tensor) -> torch.Tensor:
    g = torch.Generator().manual_seed(0)
    u, _ = torch.linalg.qr(torch.randn(1024, 256, generator=g))
    v, _ = torch.linalg.qr(torch.randn(256, 256, generator=g))
    return (u * values) @ v.T


def test_randomized_svd_is_near_optimal_on_a_decaying_spectrum():
    delta = _spectrum(torch.logspace(0, -8, 256))
    exact = decompose(delta, ExtractLoraOptions(base=Path("b"), max_rank=8, svd="exact"))
    best = torch.linalg.norm(delta - exact[1] @ exact[0])  # the Eckart-Young optimum
    for mode in ("lowrank", "auto"):
        fast = decompose(delta, ExtractLoraOptions(base=Path("b"), max_rank=8, svd=mode))
        assert not torch.equal(fast[0], exact[0])  # the sketch ran
        assert torch.linalg.norm(delta - fast[1] @ fast[0]) <= 1.001 * best


def test_auto_svd_is_exact_on_a_flat_spectrum():
    """Dense noise: no gap after the kept rank, so auto falls back to the exact SVD (bit-equal B·A)."""
    delta = _spectrum(torch.linspace(1.0, 0.8, 256))
    exact = decompose(delta, ExtractLoraOptions(base=Path("b"), max_rank=8, svd="exact"))
    auto = decompose(delta, ExtractLoraOptions(base=Path("b"), max_rank=8, svd="auto"))
    assert torch.equal(auto[0], exact[0]) and torch.equal(auto[1], exact[1])


def test_refuses_a_base_of_another_shape(pair, tiny_llama, tmp_path):
    other = tiny_llama("wide", intermediate_size=96)
    with pytest.raises(WeightsmithError, match="is this the right base"):
        extract_lora(pair[1], tmp_path / "ad", base=other)
    assert not (tmp_path / "ad").exists()


def test_eval_rows_base_plus_full_rank_adapter_scores_as_the_finetune(pair, tmp_path):
    """At full rank base + adapter is the fine-tune, so its perplexity is the fine-tune's."""
    base, ft = pair
    word_tokenizer(ft)
    text = tmp_path / "held.txt"
    text.write_text(" ".join(f"_tok_{i * 7 % 125 + 3}" for i in range(300)))
    rows = extract_lora(ft, tmp_path / "ad", base=base, max_rank=64, data=text)["eval"]
    assert [r["role"] for r in rows] == ["base", "base + adapter", "fine-tune"]
    assert rows[1]["perplexity"] == pytest.approx(rows[2]["perplexity"], rel=1e-4)
    assert rows[0]["perplexity"] != pytest.approx(rows[2]["perplexity"], rel=1e-3)
    assert rows[1]["size_bytes"] == (tmp_path / "ad" / "adapter_model.safetensors").stat().st_size


def test_cli_refuses_an_output_inside_an_input(pair, monkeypatch, capsys):
    from cli_check import snapshot

    from weightsmith.cli import main

    base, ft = pair
    before = snapshot(ft)
    monkeypatch.setattr("sys.argv", ["weightsmith", "extract-lora", "--model", str(ft), "--base-model", str(base),
                                     "--out-path", str(ft / "inside")])
    with pytest.raises(SystemExit) as exit_:
        main()
    err = capsys.readouterr().err.strip()
    assert exit_.value.code == 2 and err.startswith("error:") and "inside" in err and "\n" not in err
    assert snapshot(ft) == before
