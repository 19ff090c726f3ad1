"""The analyze stage on a causal LM, on the real all-MiniLM-L6-v2 encoder and through the CLI."""
import json

import pytest
from typer.testing import CliRunner

from weightsmith.cli import app
from weightsmith.errors import OutOfRange, WeightsmithError
from weightsmith.fold import analyze


def test_analyze_writes_json_and_heatmap_for_lm(zoo, tmp_path):
    rep = analyze(zoo.model("base"), tmp_path / "a", data=zoo.data("general", "calib"), device="cpu", max_tokens=1024)
    saved = json.loads((tmp_path / "a" / "analysis.json").read_text())
    assert (tmp_path / "a" / "heatmap.png").stat().st_size > 1000
    assert saved["num_blocks"] == 4 and len(saved["block_influence"]) == 4
    assert all(saved["cka"][i][i] == pytest.approx(1.0) for i in range(5))
    # d(l, l+n) is defined exactly for l + n <= N
    assert [sum(v is not None for v in row) for row in saved["angular_distance_last_token"]] == [4, 3, 2, 1]
    assert rep["shortgpt_drop"] == sorted(range(4), key=lambda i: rep["block_influence"][i])[:1]


def test_analyze_real_minilm_encoder(zoo, tmp_path):
    from weightsmith.zoo import minilm_path

    rep = analyze(minilm_path(), data=zoo.data("prose", "calib"), device="cpu", max_tokens=512, remove=1 / 3)
    assert rep["num_blocks"] == 6 and len(rep["shortgpt_drop"]) == 2 and len(rep["angular_drop"]) == 2
    assert all(0 < b < 1 for b in rep["block_influence"])


def test_analyze_cli_json_and_bad_input(zoo, tmp_path):
    runner = CliRunner()
    res = runner.invoke(app, ["analyze", str(zoo.model("base")), "--data", str(zoo.data("general", "calib")),
                              "--max-tokens", "512", "--device", "cpu", "--json"])
    assert res.exit_code == 0, res.output
    assert json.loads(res.output)["num_blocks"] == 4
    with pytest.raises(OutOfRange, match=r"^remove: 1.5 is out of range"):  # the library names the parameter
        analyze(zoo.model("base"), data=zoo.data("general", "calib"), remove=1.5)
    with pytest.raises(WeightsmithError, match="not found"):
        analyze(zoo.model("base"), data=tmp_path / "missing.txt")
