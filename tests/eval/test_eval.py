"""Perplexity and accuracy against direct computations; the zoo's base model is a real language model."""
from __future__ import annotations

import collections
import json
import math

import pytest
import torch
import torch.nn.functional as F

from weightsmith.errors import WeightsmithError
from weightsmith.eval import (accuracy, evaluate, load_labelled, load_texts, load_tokenizer, perplexity, tokenize,
                              windows)
from weightsmith.loading import load


def direct_nll(model, ids: torch.Tensor, begin: int, end: int, first_scored: int) -> tuple[float, int]:
    """Sum of -log p(ids[t] | ids[begin:t]) for t in [first_scored, end), one position at a time."""
    with torch.no_grad():
        logits = model(input_ids=ids[begin:end][None]).logits[0]
    logp = F.log_softmax(logits.double(), -1)
    total = -sum(logp[t - begin - 1, ids[t]].item() for t in range(first_scored, end))
    return total, end - first_scored


def test_windows_score_every_token_but_the_first_once():
    for n, ctx, stride in [(100, 16, 16), (100, 16, 5), (7, 16, 8), (33, 8, 1)]:
        scored = []
        for b, e, s in windows(n, ctx, stride):
            assert e - b <= ctx and s <= e - b - 1 + (b > 0)
            scored += list(range(e - s, e))
        assert scored == list(range(1, n))


def test_perplexity_matches_direct_computation(tiny_llama):
    model = load(tiny_llama(max_position_embeddings=32))
    ids = torch.randint(0, 128, (70,), generator=torch.Generator().manual_seed(1))
    for stride in (16, 7):
        got = perplexity(model, ids, context=16, stride=stride, batch_size=3)
        nll = count = 0
        for b, e, s in windows(70, 16, stride):
            part, c = direct_nll(model, ids, b, e, e - s)
            nll += part
            count += c
        assert got["tokens"] == count == 69
        assert got["perplexity"] == pytest.approx(math.exp(nll / count), rel=1e-5)


def test_zoo_base_is_far_better_than_unigram_and_uniform(zoo):
    path = zoo.model("base")
    tok = load_tokenizer(path)
    ids = tokenize(tok, load_texts(zoo.data("prose")), max_tokens=3000)
    counts = collections.Counter(ids.tolist())
    unigram = math.exp(-sum(c / len(ids) * math.log(c / len(ids)) for c in counts.values()))
    ppl = perplexity(load(path), ids, context=128, stride=64)["perplexity"]
    assert ppl < 0.5 * unigram < len(tok)


def test_finetunes_specialise(zoo):
    rows = evaluate([zoo.model("base"), zoo.model("ft-prose")], data=zoo.data("prose"), max_tokens=2000, device="cpu")
    assert rows[1].perplexity < 0.8 * rows[0].perplexity


def test_accuracy_matches_argmax(tmp_path):
    from transformers import AutoTokenizer

    from weightsmith.zoo.synthetic import random_bert

    tok = load_tokenizer  # keep the public loader in the path under test
    path = random_bert(tmp_path / "clf", classes=3, vocab_size=1024)
    from weightsmith.zoo import build  # noqa: F401  (tokenizer comes from the zoo)
    zoo_tok = AutoTokenizer.from_pretrained(str(build("tiny").tokenizer))
    zoo_tok.save_pretrained(path)
    texts = [f"def f{i}(x): return x * {i}" for i in range(20)]
    labels = [i % 3 for i in range(20)]
    (tmp_path / "d.jsonl").write_text("\n".join(json.dumps({"text": t, "label": y}) for t, y in zip(texts, labels)))
    model = load(path)
    got = accuracy(model, tok(path), *load_labelled(tmp_path / "d.jsonl"), batch_size=6)
    with torch.no_grad():
        enc = zoo_tok(texts, padding=True, return_tensors="pt")
        pred = model(**enc).logits.argmax(-1)
    assert got["accuracy"] == pytest.approx((pred == torch.tensor(labels)).float().mean().item())
    (tmp_path / "d.csv").write_text("text,label\n" + "\n".join(f'"{t}",{y}' for t, y in zip(texts, labels)))
    assert load_labelled(tmp_path / "d.csv") == (texts, [str(y) for y in labels])


def test_data_errors(tmp_path):
    (tmp_path / "bad.jsonl").write_text('{"text": "a"}\n{"txt": "b"}\n')
    with pytest.raises(WeightsmithError, match=r"bad.jsonl:2: record has no 'text' field"):
        load_texts(tmp_path / "bad.jsonl")
    with pytest.raises(WeightsmithError, match="data file not found"):
        load_texts(tmp_path / "missing.txt")
    (tmp_path / "e.txt").write_text("  \n")
    with pytest.raises(WeightsmithError, match="empty"):
        load_texts(tmp_path / "e.txt")
    with pytest.raises(WeightsmithError, match="nothing to measure"):
        evaluate([tmp_path])


def test_image_accuracy_matches_argmax_through_the_folders_image_processor(tmp_path):
    from PIL import Image
    from transformers import ViTConfig, ViTForImageClassification, ViTImageProcessor

    torch.manual_seed(0)
    cfg = ViTConfig(image_size=8, patch_size=4, num_channels=1, hidden_size=16, num_hidden_layers=1,
                    num_attention_heads=2, intermediate_size=32, num_labels=3, initializer_range=1.0,
                    id2label={0: "zero", 1: "one", 2: "two"}, label2id={"zero": 0, "one": 1, "two": 2})
    model_dir = tmp_path / "vit"
    ViTForImageClassification(cfg).eval().save_pretrained(model_dir)
    processor = ViTImageProcessor(size={"height": 8, "width": 8}, image_mean=[0.5], image_std=[0.5])
    processor.save_pretrained(model_dir)
    data = tmp_path / "digits"
    data.mkdir()
    pixels = (torch.rand(12, 8, 8) * 255).to(torch.uint8)
    labels = [i % 3 for i in range(12)]
    for i, p in enumerate(pixels):
        Image.fromarray(p.numpy(), mode="L").save(data / f"{i}.png")
    (data / "test.jsonl").write_text("\n".join(json.dumps({"image": f"{i}.png", "label": ["zero", "one", "two"][y]})
                                               for i, y in enumerate(labels)))
    (data / "test.csv").write_text("image,label\n" + "\n".join(f"{i}.png,{y}" for i, y in enumerate(labels)))
    model = load(model_dir)
    with torch.no_grad():
        pred = model(pixel_values=(pixels.float() / 255 - 0.5).div(0.5).unsqueeze(1)).logits.argmax(-1)
    assert len(set(pred.tolist())) > 1  # the preprocessing matters: not one class for every image
    want = (pred == torch.tensor(labels)).float().mean().item()
    for f in ("test.jsonl", "test.csv"):
        row = evaluate([model_dir], labelled=data / f, batch_size=5, device="cpu")[0]
        assert row.accuracy == pytest.approx(want) and row.perplexity is None
    (data / "bad.jsonl").write_text(json.dumps({"image": "nope.png", "label": 0}))
    with pytest.raises(WeightsmithError, match="nope.png not found"):
        evaluate([model_dir], labelled=data / "bad.jsonl", device="cpu")


def test_an_encoder_is_scored_against_its_reference_by_sentence_embeddings(tmp_path):
    """eval --reference on the real all-MiniLM-L6-v2: itself agrees exactly; a copy with one block perturbed agrees
    less, with the cosine and Spearman figures an independent computation (scipy) gives."""
    import shutil

    from safetensors.torch import load_file, save_file
    from scipy.stats import spearmanr

    from weightsmith.eval import evaluate
    from weightsmith.eval.embeddings import embed, sentences_of
    from weightsmith.pooling import read_pooling
    from weightsmith.zoo import minilm_path

    original = minilm_path()
    moved = tmp_path / "moved"
    shutil.copytree(original, moved, ignore=shutil.ignore_patterns("*.bin", "*.onnx", "onnx", "openvino", "*.h5"))
    weights = load_file(moved / "model.safetensors")
    name = next(n for n in weights if "layer.3" in n and "intermediate.dense.weight" in n)
    torch.manual_seed(1)
    weights[name] = weights[name] + 0.05 * torch.randn_like(weights[name])
    save_file(weights, moved / "model.safetensors", metadata={"format": "pt"})
    data = tmp_path / "sentences.txt"
    data.write_text("\n".join(["The cat sat on the mat.", "A dog ran in the park.", "Stocks fell sharply today.",
                               "The market dropped at the open.", "She plays the violin.", "Music fills the hall.",
                               "Rain is expected tomorrow.", "The weather will be wet."]))
    same, perturbed = (evaluate([m], data=data, reference=original, device="cpu")[0].extra for m in (original, moved))
    assert same["cosine"] > 0.9999 and same["spearman"] > 0.9999 and same["sentences"] == 8
    assert 0.5 < perturbed["cosine"] < 0.9999 and perturbed["spearman"] < 1.0
    from weightsmith.eval import load_tokenizer
    from weightsmith.loading import load

    tok, sentences = load_tokenizer(original), sentences_of([data.read_text()])
    ref = embed(load(original), tok, sentences, read_pooling(original), 4, torch.device("cpu"), 128)
    got = embed(load(moved), tok, sentences, read_pooling(moved), 4, torch.device("cpu"), 128)
    iu = torch.triu_indices(8, 8, 1)
    want = spearmanr((got @ got.T)[iu[0], iu[1]].numpy(), (ref @ ref.T)[iu[0], iu[1]].numpy()).statistic
    assert abs(perturbed["spearman"] - want) < 1e-9
    assert abs(perturbed["cosine_min"] - float((got * ref).sum(-1).min())) < 1e-6


def test_an_encoder_without_a_reference_is_refused_by_name(tmp_path):
    from weightsmith.eval import evaluate
    from weightsmith.errors import WeightsmithError
    from weightsmith.zoo import minilm_path

    data = tmp_path / "s.txt"
    data.write_text("one sentence.\nanother one.\n")
    with pytest.raises(WeightsmithError, match="encoder without a language-model or classification head.*reference"):
        evaluate([minilm_path()], data=data, device="cpu")
