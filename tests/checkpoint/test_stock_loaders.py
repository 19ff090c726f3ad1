"""What weightsmith writes loads right in the stock tool it resembles, or fails loudly there: a folded folder that
shares blocks and an RPS folder name their own model type, so transformers' auto classes and sentence-transformers
refuse them naming `weightsmith export --plain`, while weightsmith.load, a folder written before (stock model type,
sentence-transformers files beside the weights) and the plain export give exactly the same model."""
import json
import shutil

import pytest
import torch
from safetensors.torch import load_file

import weightsmith
from weightsmith.checkpoint.formats import ST_ASIDE
from weightsmith.checkpoint.hub import plan_push
from weightsmith.inspect import summarize
from weightsmith.compressor.format import export_plain as export_rps
from weightsmith.compressor.rps import compress_rps
from weightsmith.eval import load_tokenizer
from weightsmith.errors import WeightsmithError
from weightsmith.eval.embeddings import embed
from weightsmith.fold import fold
from weightsmith.fold.format import export_plain as export_folded
from weightsmith.pooling import read_pooling
from weightsmith.zoo import minilm_path

SENTENCES = ["The cat slept on the warm windowsill.", "Interest rates rose again this spring as prices climbed.",
             "Add flour and salt.", "Weights shared across blocks are stored once."]


def _stock_refuses(loader, folder):
    with pytest.raises(ValueError, match="weightsmith export --plain") as info:
        loader(str(folder))
    assert "model type `weightsmith-" in str(info.value)


def _written_before(folder, into):
    """``folder`` as weightsmith wrote it before formats named their own model type."""
    shutil.copytree(folder, into)
    config = json.loads((into / "config.json").read_text())
    stock = config["weightsmith"].pop("stock")
    config.update(stock)
    (into / "config.json").write_text(json.dumps(config))
    if (into / ST_ASIDE).is_dir():
        shutil.copytree(into / ST_ASIDE, into, dirs_exist_ok=True)
        shutil.rmtree(into / ST_ASIDE)
    return into


def _same_state(a, b):
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    assert all(torch.equal(sa[k], sb[k]) for k in sa)


def _logits(model, ids=torch.arange(3, 40)[None]):
    with torch.no_grad():
        return model(ids).logits


def _plain_files_equal(a, b):
    ta, tb = load_file(str(a / "model.safetensors")), load_file(str(b / "model.safetensors"))
    assert ta.keys() == tb.keys() and all(torch.equal(ta[k], tb[k]) for k in ta)
    assert json.loads((a / "config.json").read_text()) == json.loads((b / "config.json").read_text())


@pytest.fixture(scope="module")
def causal(zoo, tmp_path_factory):
    """The zoo base folded with blocks shared in pairs, and compressed to RPS."""
    root = tmp_path_factory.mktemp("causal")
    fold(zoo.model("base"), root / "folded", data=zoo.data("general", "calib"), remove=0.0, share="2",
         share_init="first", max_tokens=512, device="cpu")
    compress_rps(zoo.model("base"), root / "rps", budget=0.5, device="cpu")
    return root


@pytest.mark.parametrize("name, export", [("folded", export_folded), ("rps", export_rps)])
def test_causal_formats_are_refused_by_stock_loaders_and_load_exactly_in_weightsmith(causal, tmp_path, name, export):
    from transformers import AutoConfig, AutoModel, AutoModelForCausalLM, LlamaForCausalLM

    folder = causal / name
    config = json.loads((folder / "config.json").read_text())
    assert config["architectures"][0].startswith("Weightsmith") and config["weightsmith"]["stock"] == {
        "model_type": "llama", "architectures": ["LlamaForCausalLM"], "dtype": "float32"}
    with pytest.raises(WeightsmithError, match="weightsmith_format"):
        plan_push(folder)
    bare = shutil.copytree(folder, tmp_path / "bare", ignore=shutil.ignore_patterns("README.md"))
    assert "library_name: weightsmith" in plan_push(bare, weightsmith_format=True)["card"]  # the card push writes
    card = (folder / "README.md").read_text()
    assert "library_name: weightsmith" in card and f"weightsmith export --plain {name} -o {name}-plain" in card
    for loader in (AutoModelForCausalLM.from_pretrained, AutoModel.from_pretrained, AutoConfig.from_pretrained):
        _stock_refuses(loader, folder)
    with pytest.raises(AttributeError, match="weightsmith export --plain"):  # the class named: the dtype refuses
        LlamaForCausalLM.from_pretrained(str(folder))
    ours = weightsmith.load(folder)
    assert ours.config.model_type == "llama" and summarize(folder)["architecture"] == "LlamaForCausalLM"
    _same_state(ours, weightsmith.load(_written_before(folder, tmp_path / "before")))
    export(folder, tmp_path / "plain")
    export(tmp_path / "before", tmp_path / "plain-before")
    _plain_files_equal(tmp_path / "plain", tmp_path / "plain-before")
    stock = AutoModelForCausalLM.from_pretrained(str(tmp_path / "plain")).eval()
    assert stock.config.model_type == "llama"
    assert torch.equal(_logits(stock), _logits(ours))


def test_a_fold_that_shares_nothing_stays_a_stock_folder(zoo, tmp_path):
    from transformers import AutoModelForCausalLM

    fold(zoo.model("base"), tmp_path / "f", data=zoo.data("general", "calib"), remove=0.25, importance="bi",
         max_tokens=512, device="cpu")
    config = json.loads((tmp_path / "f" / "config.json").read_text())
    assert config["model_type"] == "llama" and "stock" not in config["weightsmith"]
    assert "library_name: transformers" in (tmp_path / "f" / "README.md").read_text()
    stock = AutoModelForCausalLM.from_pretrained(str(tmp_path / "f")).eval()
    assert torch.equal(_logits(stock), _logits(weightsmith.load(tmp_path / "f")))
    assert plan_push(tmp_path / "f")["format"] == "folded"  # push uploads it: stock loaders load it right


def _encode_ours(folder):
    model = weightsmith.load(folder)
    return embed(model, load_tokenizer(folder), SENTENCES, read_pooling(folder), 8, torch.device("cpu"), 128)


@pytest.mark.parametrize("name", ["folded", "rps"])
def test_minilm_formats_are_refused_by_sentence_transformers_and_their_export_encodes_as_weightsmith(
        zoo, tmp_path, name):
    st = pytest.importorskip("sentence_transformers")
    folder = tmp_path / name
    if name == "folded":
        fold(minilm_path(), folder, data=zoo.data("prose", "calib"), remove=0.0, share="2", share_init="first",
             max_tokens=256, device="cpu")
    else:
        compress_rps(minilm_path(), folder, budget=0.5, modules=r".*layer\.[0-2]\..*dense", device="cpu")
    assert not (folder / "modules.json").exists() and (folder / ST_ASIDE / "modules.json").is_file()
    assert read_pooling(folder).source == "1_Pooling/config.json + Normalize"
    assert read_pooling(_written_before(folder, tmp_path / "before")).source == "1_Pooling/config.json + Normalize"
    _stock_refuses(lambda f: st.SentenceTransformer(f, device="cpu"), folder)
    from transformers import BertModel

    with pytest.raises(AttributeError, match="weightsmith export --plain"):
        BertModel.from_pretrained(str(folder))
    (export_folded if name == "folded" else export_rps)(folder, tmp_path / "plain")
    assert (tmp_path / "plain" / "modules.json").is_file() and not (tmp_path / "plain" / ST_ASIDE).exists()
    theirs = st.SentenceTransformer(str(tmp_path / "plain"), device="cpu").encode(SENTENCES, convert_to_tensor=True)
    assert torch.allclose(_encode_ours(folder), theirs, atol=1e-5)
    tok_config = json.loads((folder / "tokenizer_config.json").read_text())
    del tok_config["tokenizer_class"]  # transformers then picks the class by the model type: the stock one
    (folder / "tokenizer_config.json").write_text(json.dumps(tok_config))
    assert type(load_tokenizer(folder)).__name__ == "BertTokenizer"
