"""Quality direction on the zoo base LM: removing 25% of the blocks by FoldGPT gates and healing with
tail-layer distillation stays within 1.10x of the original perplexity and is not worse than ShortGPT's choice."""
import pytest

import weightsmith
from weightsmith.eval import load_tokenizer, load_texts, perplexity, tokenize
from weightsmith.fold import fold


@pytest.mark.slow
def test_gates_plus_heal_keep_perplexity_within_ten_percent(zoo, tmp_path):
    base = zoo.model("base")
    ids = tokenize(load_tokenizer(base), load_texts(zoo.data("general", "valid")), 8192)
    original = weightsmith.load(base)

    def ppl(path):
        return perplexity(weightsmith.load(path), ids, context=128, stride=128)["perplexity"]

    ref = perplexity(original, ids, context=128, stride=128)["perplexity"]
    got = {}
    for importance in ("gates", "bi"):
        for steps in (0, 200):
            out = tmp_path / f"{importance}-{steps}"
            fold(base, out, data=zoo.data("general", "calib"), remove=0.25, importance=importance, heal_steps=steps,
                 device="cpu", model=original)
            got[importance, steps] = ppl(out)
    assert got["gates", 200] < got["gates", 0]
    assert got["gates", 200] <= 1.10 * ref
    assert got["gates", 200] <= 1.01 * got["bi", 200]
