"""Output tokenizers and re-indexed vocabulary rows against mergekit 0.1.5's own builders, on small
BPE tokenizers with added tokens and models of different vocab sizes (built here, nothing downloaded)."""
from __future__ import annotations

import json

import pytest
import torch

from weightsmith.errors import WeightsmithError
from weightsmith.merge import tokenizer as tk

pytest.importorskip("mergekit.tokenizer")


def make_tokenizer(folder, size: int, added: list[str]):
    """A byte-free BPE tokenizer of ``size`` plain tokens (<unk>, <s>, </s>, _tok_3 ...) plus ``added``."""
    import tokenizers
    from transformers import LlamaTokenizerFast

    names = ["<unk>", "<s>", "</s>"] + [f"_tok_{i}" for i in range(3, size)]
    spec = {"version": "1.0", "added_tokens": [], "model": {"type": "BPE", "vocab": {t: i for i, t in enumerate(names)},
                                                            "merges": []}}
    path = folder / "raw-tokenizer.json"
    folder.mkdir(parents=True, exist_ok=True)
    tokenizers.Tokenizer.from_str(json.dumps(spec)).save(str(path))
    tok = LlamaTokenizerFast(tokenizer_file=str(path))
    tok.add_tokens(added)
    path.unlink()
    tok.save_pretrained(folder)


@pytest.fixture(scope="module")
def vocab_models(tmp_path_factory):
    """base: 64 tokens; chatml: 64 + <|im_start|>, <|im_end|> (66 rows); padded: 64 rows but its
    tokenizer lists 4 unused tokens past them."""
    from weightsmith.zoo.synthetic import random_llama

    root = tmp_path_factory.mktemp("vocab")
    out = {}
    for name, rows, added, seed in (("base", 64, [], 1), ("chatml", 66, ["<|im_start|>", "<|im_end|>"], 2),
                                    ("padded", 64, [f"<UNUSED_{i}>" for i in range(4)], 3)):
        path = random_llama(root / name, seed=seed, vocab_size=rows)
        make_tokenizer(path, 64, added)
        out[name] = str(path)
    return out


def mergekit_info(source, base, models, add_tokens=()):
    from mergekit.common import ModelReference
    from mergekit.tokenizer.build import build_tokenizer

    ref = ModelReference.parse
    src = source if source in ("base", "union") else ref(source)
    return build_tokenizer(ref(base), [ref(m) for m in models], src, False, list(add_tokens))


@pytest.mark.parametrize("source", ["base", "union", "chatml"])
def test_vocabulary_and_rows_equal_mergekit(vocab_models, source):
    z = vocab_models
    models = [z["base"], z["padded"], z["chatml"]]
    src = z[source] if source == "chatml" else source
    ours = tk.build_vocabulary(tk.TokenizerSpec(src), z["base"], models)
    ref = mergekit_info(src, z["base"], models)
    assert ours.tokenizer.get_vocab() == ref.tokenizer.get_vocab()
    assert len(ours.tokenizer.added_tokens_decoder) == len(ref.tokenizer.added_tokens_decoder)
    from mergekit.common import ModelReference
    for m in models:
        perm = ref.permutations[ModelReference.parse(m)]
        assert ours.rows[m] == [perm.get(i, -1) for i in range(len(ours.rows[m]))]
    expected = {"base": 64, "union": 66, "chatml": 66}[source]
    assert ours.size == expected
    assert not any(t.startswith("<UNUSED") for t in ours.tokenizer.get_vocab())


def _mergekit_rows(info, tensors, models, base, tokens=None, pad=None):
    from mergekit.common import ImmutableMap, ModelReference
    from mergekit.tokenizer.config import TokenEmbeddingConfig
    from mergekit.tokenizer.embed import PermutedVocabulary

    refs = [ModelReference.parse(m) for m in models]
    cfg = None
    if tokens:
        cfg = ImmutableMap({t: TokenEmbeddingConfig.model_validate(v) for t, v in tokens.items()})
    task = PermutedVocabulary.model_construct(tokens=cfg, pad_to_multiple_of=pad, base_model=ModelReference.parse(base),
                                              vocabulary_axis=0)
    out = task.execute(tokenizer_info=info, tensors=dict(zip(refs, tensors)))
    return [out[r] for r in refs]


def _embeddings(models):
    from weightsmith.checkpoint import Checkpoint
    return [Checkpoint(m).get("model.embed_tokens.weight") for m in models]


@pytest.mark.parametrize("source", ["base", "union", "chatml"])
@pytest.mark.parametrize("pad", [None, 16])
def test_permuted_rows_equal_mergekit(vocab_models, source, pad):
    z = vocab_models
    models = [z["base"], z["padded"], z["chatml"]]
    src = z[source] if source == "chatml" else source
    spec = tk.TokenizerSpec(src, pad_to_multiple_of=pad)
    vocab = tk.build_vocabulary(spec, z["base"], models)
    tensors = _embeddings(models)
    ours = tk.permute_rows(tensors, models, vocab, spec, z["base"])
    theirs = _mergekit_rows(mergekit_info(src, z["base"], models), tensors, models, z["base"], pad=pad)
    for a, b in zip(ours, theirs):
        assert torch.equal(a, b)
    assert ours[0].shape[0] == tk.padded_size(vocab.size, pad)


def test_new_token_rows_come_from_the_one_model_that_has_them(vocab_models):
    z = vocab_models
    models = [z["base"], z["chatml"]]
    spec = tk.TokenizerSpec("union")
    vocab = tk.build_vocabulary(spec, z["base"], models)
    out = tk.permute_rows(_embeddings(models), models, vocab, spec, z["base"])
    chat = _embeddings([z["chatml"]])[0]
    i = vocab.tokenizer.get_vocab()["<|im_start|>"]
    assert torch.equal(out[0][i], chat[64]) and torch.equal(out[1][i], chat[64])


def test_forced_and_model_token_sources_equal_mergekit(vocab_models, tmp_path):
    z = vocab_models
    models = [z["base"], z["chatml"]]
    raw = {"_tok_10": {"source": z["chatml"], "force": True},
           "_tok_11": {"source": z["base"], "force": True},
           "_tok_20": {"source": {"kind": "model_token", "model": z["chatml"], "token_id": 64}, "force": True},
           "_tok_21": {"source": {"kind": "model_token", "model": z["base"], "token": "<s>"}, "force": True},
           "_tok_22": {"source": {"kind": "zero"}, "force": True}}
    for source in ("base", "union"):
        spec = tk.parse_tokenizer_options({"tokenizer": {"source": source, "tokens": raw}}, "recipe",
                                          lambda v, where: v)
        vocab = tk.build_vocabulary(spec, z["base"], models)
        tk.check_token_sources(spec, vocab, models, "recipe")
        tensors = _embeddings(models)
        ours = tk.permute_rows(tensors, models, vocab, spec, z["base"])
        theirs = _mergekit_rows(mergekit_info(source, z["base"], models, raw), tensors, models, z["base"], raw)
        for a, b in zip(ours, theirs):
            assert torch.equal(a, b)
        v = vocab.tokenizer.get_vocab()
        assert torch.equal(ours[0][v["_tok_20"]], tensors[1][64])
        assert torch.equal(ours[1][v["_tok_21"]], tensors[0][1])
        assert not ours[0][v["_tok_22"]].any()


def test_tokenizer_block_refuses_unknown_keys_and_bad_values():
    ref = lambda v, where: v  # noqa: E731
    with pytest.raises(WeightsmithError, match="'sorce'.*did you mean 'source'"):
        tk.parse_tokenizer_options({"tokenizer": {"sorce": "union"}}, "recipe", ref)
    with pytest.raises(WeightsmithError, match="not both"):
        tk.parse_tokenizer_options({"tokenizer": {}, "tokenizer_source": "base"}, "recipe", ref)
    with pytest.raises(WeightsmithError, match="'forse'"):
        tk.parse_tokenizer_options({"tokenizer": {"tokens": {"a": {"forse": True}}}}, "recipe", ref)
    with pytest.raises(WeightsmithError, match="exactly one of token or token_id"):
        tk.parse_tokenizer_options({"tokenizer": {"tokens": {"a": {"source": {"kind": "model_token", "model": "m"}}}}},
                                   "recipe", ref)
    with pytest.raises(WeightsmithError, match="pad_to_multiple_of"):
        tk.parse_tokenizer_options({"tokenizer": {"pad_to_multiple_of": 0}}, "recipe", ref)
    assert tk.parse_tokenizer_options({}, "recipe", ref) is None
    assert tk.parse_tokenizer_options({"chat_template": "chatml"}, "recipe", ref).source is None


def test_chat_templates_by_name_literal_and_refused():
    assert "<|im_start|>" in tk.chat_template_text("chatml", [])
    literal = "{{messages[0]['content']}}"
    assert tk.chat_template_text(literal, []) == literal
    with pytest.raises(WeightsmithError, match="chatml"):
        tk.chat_template_text("chatmll", [])


@pytest.mark.parametrize("name", sorted(tk.CHAT_TEMPLATES))
def test_named_chat_templates_render_every_message(vocab_models, name):
    tok = tk.load_tokenizer(vocab_models["base"])
    tok.chat_template = tk.CHAT_TEMPLATES[name]
    messages = [{"role": "user", "content": "hello there"}, {"role": "assistant", "content": "general kenobi"}]
    text = tok.apply_chat_template(messages, tokenize=False)
    assert "hello there" in text and "general kenobi" in text


# -- whole merges against mergekit-yaml ------------------------------------------------------------

MK_RUNNER = """
import json, sys
from mergekit.config import MergeConfiguration
from mergekit.merge import MergeOptions, run_merge
for cfg, out in json.loads(sys.argv[1]):
    run_merge(MergeConfiguration.model_validate(cfg), out, MergeOptions(write_model_card=False, quiet=True))
"""


def tokenizer_recipes(z):
    three = [z["base"], z["padded"], z["chatml"]]

    def cfg(models, method="linear", **extra):
        return {"merge_method": method, "base_model": z["base"], "dtype": "float32",
                "models": [{"model": m, "parameters": {"weight": 1.0}} for m in models], **extra}
    return {
        "source_base": cfg(three, tokenizer_source="base"),
        "source_union": cfg(three, tokenizer_source="union"),
        "source_model": cfg(three, tokenizer_source=z["chatml"]),
        "slerp_union": {**cfg([z["base"], z["chatml"]], "slerp", tokenizer_source="union"), "parameters": {"t": 0.5},
                        "models": [{"model": z["base"]}, {"model": z["chatml"]}]},
        "force_token": cfg([z["base"], z["chatml"]], tokenizer={"source": "union", "tokens": {
            "_tok_10": {"source": z["chatml"], "force": True}, "_tok_11": {"source": z["base"], "force": True}}}),
        "model_token": cfg([z["base"], z["chatml"]], tokenizer={"source": "base", "tokens": {
            "_tok_20": {"source": {"kind": "model_token", "model": z["chatml"], "token_id": 64}, "force": True},
            "_tok_21": {"source": {"kind": "model_token", "model": z["base"], "token": "<s>"}, "force": True}}}),
        "pad_to_multiple": {**cfg([z["chatml"]], tokenizer={"source": "base", "pad_to_multiple_of": 16}),
                            "base_model": z["chatml"]},
        "chat_template_literal": cfg([z["base"], z["padded"]], chat_template="{{messages[0]['content']}}"),
        "slices_union": {"merge_method": "linear", "base_model": z["base"], "dtype": "float32",
                         "tokenizer_source": "union",
                         "slices": [{"sources": [{"model": z["base"], "layer_range": [0, 2], "parameters": {"weight": 0.7}},
                                                 {"model": z["chatml"], "layer_range": [0, 2],
                                                  "parameters": {"weight": 0.3}}]}]},
    }


@pytest.fixture(scope="module")
def mergekit_tokenizer_outputs(vocab_models, tmp_path_factory):
    import os
    import subprocess
    import sys

    root = tmp_path_factory.mktemp("mk-tok")
    jobs = [(c, str(root / n)) for n, c in tokenizer_recipes(vocab_models).items()]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "HTTPS_PROXY": "http://127.0.0.1:9"}
    proc = subprocess.run([sys.executable, "-c", MK_RUNNER, json.dumps(jobs)], env=env, capture_output=True,
                          text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return {n: str(root / n) for n in tokenizer_recipes(vocab_models)}


@pytest.mark.parametrize("name", list(tokenizer_recipes({k: k for k in ("base", "padded", "chatml")})))
def test_tokenizer_merge_equals_mergekit(name, vocab_models, mergekit_tokenizer_outputs, tmp_path):
    import yaml

    from weightsmith.checkpoint import Checkpoint
    from weightsmith.merge import merge, parse_recipe

    recipe = tokenizer_recipes(vocab_models)[name]
    merge(parse_recipe(yaml.safe_dump(recipe)), tmp_path / "ws", device="cpu")
    ours, theirs = Checkpoint(tmp_path / "ws"), Checkpoint(mergekit_tokenizer_outputs[name])
    assert sorted(ours.names()) == sorted(theirs.names())
    for n in ours.names():
        assert torch.equal(ours.get(n), theirs.get(n)), n
    assert ours.config["vocab_size"] == theirs.config["vocab_size"]
    a, b = tk.load_tokenizer(str(tmp_path / "ws")), tk.load_tokenizer(mergekit_tokenizer_outputs[name])
    assert a.get_vocab() == b.get_vocab()
    assert (a.chat_template or None) == (b.chat_template or None)


def test_an_input_without_tokenizer_shares_the_base_vocabulary_with_a_note(vocab_models, tmp_path):
    import yaml

    from weightsmith.checkpoint import Checkpoint
    from weightsmith.merge import merge, parse_recipe
    from weightsmith.zoo.synthetic import random_llama

    bare = random_llama(tmp_path / "bare", seed=9, vocab_size=64)
    z = vocab_models
    recipe = {"merge_method": "linear", "base_model": z["base"], "tokenizer_source": "union",
              "models": [{"model": z["base"]}, {"model": str(bare)}, {"model": z["chatml"]}]}
    report = merge(parse_recipe(yaml.safe_dump(recipe)), tmp_path / "out", device="cpu")
    assert any("bare has no tokenizer" in n for n in report["notes"])
    out = Checkpoint(tmp_path / "out").get("model.embed_tokens.weight")
    rows = [Checkpoint(m).get("model.embed_tokens.weight") for m in (z["base"], str(bare), z["chatml"])]
    torch.testing.assert_close(out[:64], sum(r[:64] for r in rows) / 3)
    torch.testing.assert_close(out[64], rows[2][64])  # <|im_start|>: only the chatml model has it


CONVERSATIONS = [
    [{"role": "system", "content": "Answer in one line."}, {"role": "user", "content": "What is 2+2?"},
     {"role": "assistant", "content": "4"}, {"role": "user", "content": "And 3+3?"}],
    [{"role": "user", "content": "  spaced out  "}, {"role": "assistant", "content": " fine "}],
    [{"role": "user", "content": "q"}, {"role": "user_context", "content": "ctx"}, {"role": "assistant", "content": "a"}],
    [{"role": "system", "content": "first"}, {"role": "system", "content": " second "}, {"role": "user", "content": "u"}],
    [{"role": "assistant", "content": "out of turn"}],
]


@pytest.mark.parametrize("name", sorted(tk.CHAT_TEMPLATES))
def test_named_chat_templates_render_mergekits_prompts(name):
    import importlib.resources

    from mergekit._data import chat_templates
    from transformers.utils.chat_template_utils import _compile_jinja_template

    theirs = _compile_jinja_template(importlib.resources.files(chat_templates).joinpath(f"{name}.jinja").read_text())
    ours = _compile_jinja_template(tk.CHAT_TEMPLATES[name])

    def render(template, **kw):
        try:
            return template.render(**kw)
        except Exception as exc:  # noqa: BLE001 - a template that refuses a conversation must refuse it in both
            return f"refused ({type(exc).__name__})"
    for conversation in CONVERSATIONS:
        for generation in (False, True):
            kw = dict(messages=conversation, bos_token="<s>", eos_token="</s>", add_generation_prompt=generation)
            assert render(ours, **kw) == render(theirs, **kw), (conversation, generation)
