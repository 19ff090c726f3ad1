"""Sentence-transformers pooling: read from the folder, equal to sentence-transformers' own encode, carried
through folded folders (kept aside there) into exported ones so they load there; bad pooling files are refused."""
import json
import random
import shutil

import pytest
import torch

import weightsmith
from weightsmith.checkpoint.formats import ST_ASIDE
from weightsmith.errors import WeightsmithError
from weightsmith.eval import load_tokenizer
from weightsmith.fold import fold
from weightsmith.fold.format import export_plain
from weightsmith.pooling import Pooling, read_pooling
from weightsmith.zoo import minilm_path

SENTENCES = ["The cat slept on the warm windowsill.", "Interest rates rose again this spring as prices climbed.",
             "Add flour and salt."]


def embed(model, path, pooling):
    tok = load_tokenizer(path)
    enc = tok(SENTENCES, padding=True, return_tensors="pt")
    with torch.no_grad():
        return pooling(model(**enc).last_hidden_state, enc["attention_mask"])


def test_minilm_pooling_is_mean_then_normalize_and_matches_by_hand():
    pooling = read_pooling(minilm_path())
    assert pooling.modes == ["mean"] and pooling.normalize
    h = torch.randn(2, 5, 4)
    mask = torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1]])
    by_hand = torch.stack([h[0, :3].mean(0), h[1].mean(0)])
    assert torch.allclose(pooling(h, mask), by_hand / by_hand.norm(dim=-1, keepdim=True), atol=1e-6)
    both = Pooling(modes=["cls", "max", "mean_sqrt_len"])(h, mask)
    assert torch.allclose(both[0], torch.cat([h[0, 0], h[0, :3].amax(0), h[0, :3].sum(0) / 3 ** 0.5]), atol=1e-6)


def test_folded_and_exported_minilm_load_in_sentence_transformers(tmp_path, zoo):
    st = pytest.importorskip("sentence_transformers")
    res = fold(minilm_path(), tmp_path / "f", data=zoo.data("prose", "calib"), remove=0.34, share="2",
               importance="bi", heal_steps=2, seq_len=32, max_tokens=512, batch_size=4, device="cpu")
    assert res["pooling"] == "1_Pooling/config.json + Normalize"
    for name in ("modules.json", "1_Pooling/config.json", "sentence_bert_config.json"):  # kept aside: shared blocks
        assert (tmp_path / "f" / ST_ASIDE / name).is_file() and not (tmp_path / "f" / name).exists(), name
    export_plain(tmp_path / "f", tmp_path / "p")
    assert (tmp_path / "p" / "1_Pooling" / "config.json").is_file()
    ours = embed(weightsmith.load(tmp_path / "f"), tmp_path / "f", read_pooling(tmp_path / "f"))
    theirs = st.SentenceTransformer(str(tmp_path / "p"), device="cpu").encode(SENTENCES, convert_to_tensor=True)
    assert torch.allclose(ours, theirs, atol=1e-5)
    original = st.SentenceTransformer(str(minilm_path()), device="cpu").encode(SENTENCES, convert_to_tensor=True)
    assert torch.allclose(embed(weightsmith.load(minilm_path()), minilm_path(), read_pooling(minilm_path())),
                          original, atol=1e-5)


@pytest.mark.parametrize("edit, match", [
    (lambda d: (d / "1_Pooling" / "config.json").write_text(json.dumps({"pooling_mode_median": True})), "pooling_mode_median"),
    (lambda d: (d / "1_Pooling" / "config.json").write_text(json.dumps({"pooling_mode_mean_tokens": False})), "no pooling_mode"),
    (lambda d: (d / "modules.json").write_text(json.dumps([{"path": "x", "type": "sentence_transformers.models.Foo"}])), "Foo"),
    (lambda d: (d / "modules.json").write_text("{"), "not valid JSON"),
    (lambda d: shutil.rmtree(d / "1_Pooling"), "missing"),
])
def test_bad_pooling_files_are_refused(tmp_path, edit, match):
    src = minilm_path()
    d = tmp_path / "m"
    d.mkdir()
    shutil.copy2(src / "modules.json", d / "modules.json")
    shutil.copytree(src / "1_Pooling", d / "1_Pooling")
    edit(d)
    with pytest.raises(WeightsmithError, match=match):
        read_pooling(d)


def test_encoder_heal_data_is_one_padded_input_per_line(tmp_path):
    from weightsmith.data import calibration_sentences

    tok = load_tokenizer(minilm_path())
    (tmp_path / "c.txt").write_text("\n".join(SENTENCES) + "\n\n  \n")
    data = calibration_sentences(tok, tmp_path / "c.txt", seq_len=8, max_tokens=10_000)
    assert len(data) == 3  # blank lines are not inputs
    x, mask = data.batch([1, 2])
    alone = tok(SENTENCES[2])["input_ids"]
    assert x.shape == (2, 8) and mask[0].sum() == 8  # truncated to the window
    assert x[1, :len(alone)].tolist() == alone and mask[1].tolist() == [1] * len(alone) + [0] * (8 - len(alone))
    assert (x[1, len(alone):] == tok.pad_token_id).all()
    assert len(calibration_sentences(tok, tmp_path / "c.txt", seq_len=64, max_tokens=5)) == 1


def test_masked_heal_loss_of_a_padded_batch_is_the_loss_of_each_sentence_alone():
    """Padding must not leak into the encoder's heal objective: the pooled term of a padded batch is the mean
    of the sentences' own, and the hidden-state term the token-weighted mean."""
    from weightsmith.fold.heal import distill_loss
    from weightsmith.fold.plan import fold_model
    from weightsmith.checkpoint import read_json

    path = minilm_path()
    teacher, pooling, tok = weightsmith.load(path), read_pooling(path), load_tokenizer(path)
    student = fold_model(teacher, read_json(path / "config.json", "config"), [2], [1] * 5)
    kw = dict(causal=False, tail=2, lm_weight=0, kd_weight=0, temperature=2.0, pooling=pooling)
    enc = tok(SENTENCES, padding=True, return_tensors="pt")
    alone = [tok(s, return_tensors="pt")["input_ids"] for s in SENTENCES]
    with torch.no_grad():
        padded = distill_loss(student, teacher, enc["input_ids"], enc["attention_mask"], mse_weight=0, pooled_weight=1, **kw)
        each = [distill_loss(student, teacher, a, mse_weight=0, pooled_weight=1, **kw) for a in alone]
        assert padded.item() == pytest.approx(sum(each).item() / 3, rel=1e-4)
        padded = distill_loss(student, teacher, enc["input_ids"], enc["attention_mask"], mse_weight=1, pooled_weight=0, **kw)
        each = [distill_loss(student, teacher, a, mse_weight=1, pooled_weight=0, **kw) * a.shape[1] for a in alone]
        assert padded.item() == pytest.approx(sum(each).item() / sum(a.shape[1] for a in alone), rel=1e-4)
        assert padded.item() != pytest.approx(distill_loss(student, teacher, enc["input_ids"], mse_weight=1,
                                                           pooled_weight=0, **kw).item(), rel=1e-3)


def test_sentences_group_by_length_within_the_padding_bound():
    from weightsmith.data import Sentences

    lengths = [3, 40, 7, 8, 39, 12, 5, 30, 31, 9, 10, 2]
    data = Sentences([[1] * n for n in lengths], 0)
    idx = [5, 0, 11, 3, 1, 8, 2, 6, 9, 4, 10, 7, 3]  # a repeat, as a random batch may hold
    groups = data.groups(idx)
    assert sorted(i for g in groups for i in g) == sorted(idx)
    for g in groups:
        real = sum(lengths[i] for i in g)
        assert len(g) * max(lengths[i] for i in g) <= 1.3 * real
    padded = sum(len(g) * max(lengths[i] for i in g) for g in groups)
    assert padded < 0.6 * len(idx) * max(lengths)  # one batch padded to the longest would be mostly padding
    assert len(data.groups(idx, waste=100)) == 1


def test_heal_parts_of_similar_length_add_up_to_the_whole_padded_batch():
    """The heal runs a batch of sentences as groups of similar length: the parts' weighted losses and their
    accumulated gradients equal those of the one padded batch."""
    from weightsmith.checkpoint import read_json
    from weightsmith.fold.heal import _parts, distill_loss
    from weightsmith.fold.plan import fold_model
    from weightsmith.data import Sentences

    path = minilm_path()
    teacher, pooling, tok = weightsmith.load(path), read_pooling(path), load_tokenizer(path)
    student = fold_model(teacher, read_json(path / "config.json", "config"), [2], [1] * 5)
    kw = dict(causal=False, tail=2, lm_weight=0, kd_weight=0, temperature=2.0, pooling=pooling, mse_weight=1.0,
              pooled_weight=1.0)
    texts = SENTENCES + ["A much longer sentence, so that the batch holds inputs of very different lengths, "
                         "which is what the grouping is for.", "Short one."]
    data = Sentences([tok(t)["input_ids"] for t in texts], tok.pad_token_id)
    idx = torch.tensor([0, 3, 1, 4, 2, 3])
    parts = _parts(data, idx)
    assert len(parts) > 1
    assert sum(p[2] for p in parts) == pytest.approx(1) and sum(p[3] for p in parts) == pytest.approx(1)

    def grads(loss):
        student.zero_grad()
        loss.backward()
        return torch.cat([p.grad.reshape(-1) for p in student.parameters() if p.grad is not None])
    x, mask = data.batch(idx.tolist())
    whole = distill_loss(student, teacher, x, mask, **kw)
    g_whole = grads(whole)
    total, g_parts = 0.0, 0
    for x, mask, rows, tokens in parts:
        part = distill_loss(student, teacher, x, mask, rows=rows, tokens=tokens, **kw)
        total += part.item()
        g_parts = g_parts + grads(part)
    assert total == pytest.approx(whole.item(), rel=1e-4)
    assert torch.allclose(g_parts, g_whole, rtol=1e-3, atol=1e-6)
    assert not torch.allclose(grads(distill_loss(student, teacher, *data.batch([0, 3]), **kw)), g_whole, rtol=1e-2)


def test_spliced_sentences_join_the_start_of_one_input_to_the_end_of_another():
    from weightsmith.data import Sentences, special_counts

    tok = load_tokenizer(minilm_path())
    assert special_counts(tok) == (1, 1)
    texts = SENTENCES + ["A much longer sentence, so that the inputs have very different lengths to cut."]
    data = Sentences([tok(t)["input_ids"] for t in texts], tok.pad_token_id, *special_counts(tok))
    idx = [0, 1, 2, 3, 0, 2] * 20
    assert data.spliced(idx, 0.0, torch.Generator().manual_seed(0)).ids == [data.ids[i] for i in idx]
    out = data.spliced(idx, 1.0, torch.Generator().manual_seed(0)).ids
    assert out == data.spliced(idx, 1.0, torch.Generator().manual_seed(0)).ids  # the generator decides
    bodies = [ids[1:-1] for ids in data.ids]
    new = 0
    for i, ids in zip(idx, out):
        assert ids[0] == tok.cls_token_id and ids[-1] == tok.sep_token_id
        body = ids[1:-1]
        a = bodies[i]
        cuts = [c for c in range(1, min(len(a) + 1, len(body))) if body[:c] == a[:c]]
        assert cuts, "a spliced input starts with its own sentence's first token"
        assert any(any(len(b) >= len(body) - c and body[c:] == b[len(b) - len(body) + c:] for b in bodies)
                   for c in cuts), "and ends with the end of another one"
        assert len(body) <= max(map(len, bodies))
        new += ids not in data.ids
    assert new > len(idx) / 2
    mixed = data.spliced(idx, 0.5, torch.Generator().manual_seed(1)).ids
    assert 0.25 < sum(m != data.ids[i] for i, m in zip(idx, mixed)) / len(idx) < 0.75


def test_special_counts_of_a_tokenizer_without_specials(zoo):
    from weightsmith.data import special_counts

    assert special_counts(load_tokenizer(zoo.model("base"))) == (0, 0)


def test_encoder_heal_options_are_refused_for_a_causal_lm(zoo, tmp_path):
    from weightsmith.errors import OptionError
    from weightsmith.fold import fold
    from weightsmith.fold.heal import heal

    base, calib = zoo.model("base"), zoo.data("general", "calib")
    for key, value in (("heal_splice", 0.5), ("heal_pooled_weight", 3.0)):
        with pytest.raises(OptionError, match=f"^{key}: {value} applies to encoders"):
            fold(base, tmp_path / key, data=calib, remove=0.25, importance="bi", heal_steps=1, seq_len=32, max_tokens=256,
                 device="cpu", **{key: value})
        assert not (tmp_path / key).exists()
    model = weightsmith.load(base)
    with pytest.raises(OptionError, match="^heal_splice: 0.5 needs sentences"):
        heal(model, model, torch.zeros((4, 8), dtype=torch.long), steps=1, splice=0.5)


def test_heal_passes_the_splice_and_pooled_weight_to_its_loss(tmp_path, monkeypatch):
    """The fold's encoder heal options reach the loss: every input the loss sees is a spliced one at splice 1,
    and pooled_weight is the weight of the pooled term."""
    from weightsmith.fold import fold

    seen = []
    import weightsmith.fold.heal as heal_mod
    real = heal_mod.distill_loss

    def spy(student, teacher, x, mask=None, **kw):
        seen.append((x.clone(), kw["pooled_weight"]))
        return real(student, teacher, x, mask, **kw)

    monkeypatch.setattr(heal_mod, "distill_loss", spy)
    lines = tmp_path / "lines.txt"
    words = "river stone cloud paper window garden engine silver market letter forest candle bridge orange".split()
    rng = random.Random(0)
    texts = [" ".join(rng.sample(words, 8)) + "." for _ in range(40)]
    lines.write_text("\n".join(texts))
    tok = load_tokenizer(minilm_path())
    originals = {tuple(tok(t)["input_ids"]) for t in texts}
    fold(minilm_path(), tmp_path / "o", data=lines, remove=0.17, importance="bi", heal_steps=2, batch_size=8,
         max_tokens=400, device="cpu", heal_splice=1.0, heal_pooled_weight=4.0)
    rows = [tuple(r[m.bool()].tolist()) for x, _ in seen for r, m in zip(x, x != tok.pad_token_id)]
    assert {w for _, w in seen} == {4.0}
    assert len(rows) == 16 and sum(r not in originals for r in rows) >= 12
