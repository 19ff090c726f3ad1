"""Quality direction on the zoo base LM: removing 25% of the blocks by the default importance (measured loss)
and healing with tail-layer distillation stays within 1.10x of the original perplexity and is not worse than
ShortGPT's choice; on all-MiniLM-L6-v2 one block of six goes with held-out embeddings kept."""
import pytest

import weightsmith
from weightsmith.eval import load_tokenizer, load_texts, perplexity, tokenize
from weightsmith.fold import fold


@pytest.mark.slow
def test_default_importance_plus_heal_keeps_perplexity_within_ten_percent(zoo, tmp_path):
    base = zoo.model("base")
    ids = tokenize(load_tokenizer(base), load_texts(zoo.data("general", "valid")), 8192)
    original = weightsmith.load(base)

    def ppl(path):
        return perplexity(weightsmith.load(path), ids, context=128, stride=128)["perplexity"]

    ref = perplexity(original, ids, context=128, stride=128)["perplexity"]
    got = {}
    for importance in ("loss", "bi"):
        for steps in (0, 200):
            out = tmp_path / f"{importance}-{steps}"
            fold(base, out, data=zoo.data("general", "calib"), remove=0.25, importance=importance, heal_steps=steps,
                 device="cpu", model=original)
            got[importance, steps] = ppl(out)
    assert got["loss", 200] < got["loss", 0]
    assert got["loss", 200] <= 1.10 * ref
    assert got["loss", 0] <= 1.01 * got["bi", 0]
    assert got["loss", 200] <= 1.01 * got["bi", 200]


@pytest.mark.slow
def test_minilm_one_block_removed_by_default_importance_keeps_held_out_embeddings(tmp_path):
    """all-MiniLM-L6-v2, calibration on the even pydoc topics, scored on sentences of the odd ones: the
    default importance keeps mean cosine >= 0.90 without heal, and a short heal raises it."""
    import torch

    from weightsmith.fold.english import english_sentences, write_calibration
    from weightsmith.pooling import read_pooling
    from weightsmith.zoo import minilm_path

    path = minilm_path()
    tok, pooling = load_tokenizer(path), read_pooling(path)
    held = english_sentences("heldout")[:200]
    data = write_calibration(tmp_path / "calib.txt")

    @torch.no_grad()
    def embed(model):
        enc = tok(held, padding=True, truncation=True, max_length=128, return_tensors="pt")
        return pooling(model(**enc).last_hidden_state, enc["attention_mask"])

    original = weightsmith.load(path)
    ref = embed(original)
    cos = {}
    for steps in (0, 40):
        res = fold(path, tmp_path / f"f{steps}", data=data, remove=1 / 6, heal_steps=steps, seq_len=64, heal_lr=1e-4,
                   device="cpu", model=original)
        assert res["importance"] == "loss" and len(res["removed"]) == 1
        cos[steps] = torch.nn.functional.cosine_similarity(embed(weightsmith.load(tmp_path / f"f{steps}")), ref).mean()
    assert cos[0] >= 0.90
    assert cos[40] > cos[0] + 0.005
