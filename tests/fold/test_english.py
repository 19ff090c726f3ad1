"""The in-house English text for encoder folds: the splits never share a sentence with the held-out one."""
from weightsmith.fold.english import NOT_PACKAGES, SPLITS, english_sentences, write_calibration


def test_splits_are_disjoint_from_the_held_out_text_and_from_each_other(tmp_path):
    split = {name: english_sentences(name) for name in SPLITS}
    held = set(split["heldout"])
    for name in ("calib", "docstrings", "packages"):
        assert split[name], name
        assert len(set(split[name])) == len(split[name]), f"{name} repeats a sentence"
        assert not held & set(split[name]), f"{name} shares sentences with the held-out split"
    assert not set(split["docstrings"]) & set(split["packages"])
    assert len(split["packages"]) > len(split["docstrings"])  # the packages hold more prose than the top level
    lines = write_calibration(tmp_path / "c.txt", 100, docstrings=True, packages=True).read_text().splitlines()
    assert lines == split["calib"][:100] + split["docstrings"] + split["packages"]


def test_package_text_leaves_out_test_suites_and_site_packages(tmp_path, monkeypatch):
    from weightsmith.fold import english

    prose = {"pkg/mod.py": "A package module explains here what the function does with its input.",
             "pkg/sub/deep.py": "A nested module also explains here what it does with its argument.",
             "test/test_mod.py": "A test suite module describes here which behaviour it checks today.",
             "pkg/tests/test_x.py": "Another test module describes here what it verifies about the code.",
             "site-packages/lib/x.py": "An installed package describes here what its own function returns.",
             "top.py": "A top level module describes here what its public function computes."}
    for rel, text in prose.items():
        (tmp_path / rel).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / rel).write_text(f'"""{text}"""\n')
    monkeypatch.setattr(english, "_stdlib", lambda: tmp_path)
    assert english_sentences("docstrings") == [prose["top.py"]]
    assert english_sentences("packages") == [prose["pkg/mod.py"], prose["pkg/sub/deep.py"]]
    assert {"test", "tests", "site-packages"} <= NOT_PACKAGES
