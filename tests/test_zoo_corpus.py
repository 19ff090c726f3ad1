"""The zoo's training text is pinned in the package: every Python version trains the same zoo."""
from __future__ import annotations

import importlib
import shutil

import pytest

from weightsmith.errors import WeightsmithError
from weightsmith.zoo import corpus

zoo_build = importlib.import_module("weightsmith.zoo.build")  # the module (the package exports its build())


@pytest.fixture
def fresh(monkeypatch):
    corpus._pinned.cache_clear()
    yield
    corpus._pinned.cache_clear()


def test_the_corpus_never_reads_the_running_pythons_library(fresh, monkeypatch):
    def forbidden(domain):
        raise AssertionError("read the standard library")

    monkeypatch.setattr(corpus, "_stdlib_documents", forbidden)
    monkeypatch.setattr("sysconfig.get_paths", lambda: {"stdlib": "/nonexistent"})
    assert corpus.corpus_digest() == "2b9c4d809f476a5b"  # the key of the zoo built before the text was pinned
    assert corpus.SEPARATOR in corpus.split_text("general", "train", 100_000)


def test_every_zoo_size_reads_within_the_pinned_text_and_the_file_stays_small(fresh):
    assert corpus.PINNED.stat().st_size < 1_500_000
    for size, r in zoo_build.SIZES.items():
        per = r["tokenizer_chars"] // (len(zoo_build.FT_DOMAINS) + 1)
        for d in (*zoo_build.FT_DOMAINS, corpus.GENERAL):
            train = corpus.split_text(d, "train", r["train_chars"])
            assert train.startswith(corpus.split_text(d, "train", per)), (size, d)
            assert len(corpus.split_text(d, "valid", r["valid_chars"])) > 10_000, (size, d)
    with pytest.raises(WeightsmithError, match="pinned to its first"):
        corpus.split_text("general", "valid", 10**6)  # held-out general code is pinned to 60 000 characters


def test_a_changed_corpus_file_is_refused(fresh, monkeypatch, tmp_path):
    copy = tmp_path / "corpus.json.xz"
    shutil.copy(corpus.PINNED, copy)
    with open(copy, "r+b") as f:
        f.seek(1000)
        byte = f.read(1)
        f.seek(1000)
        f.write(bytes([byte[0] ^ 1]))
    monkeypatch.setattr(corpus, "PINNED", copy)
    with pytest.raises(WeightsmithError, match="sha256 .* is not the pinned"):
        corpus.split_text("prose", "valid")
