"""No stage publishes a non-finite model: every tensor a stage writes into its output folder passes one publish
check (``checkpoint.writer``); a NaN/inf is one line naming the tensor and the stage, exit 2, and nothing is
written (no OUT, no temp folder). merge keeps its own value checks and its --allow-nonfinite."""
from __future__ import annotations

import shutil

import pytest
import torch

from cli_check import refused, snapshot
from hostile import cli, nan_at, set_config
from weightsmith.checkpoint import save_state_dict
from weightsmith.checkpoint.writer import output_folder
from weightsmith.errors import WeightsmithError

HUGE_LR = "1e12"  # a heal that diverges within two steps


@pytest.fixture(scope="module")
def models(tmp_path_factory, zoo):
    """A random two-layer Llama with the zoo's tokenizer, its RPS compression, and text to heal on."""
    from weightsmith.compressor.rps import compress_rps
    from weightsmith.zoo.synthetic import random_llama

    root = tmp_path_factory.mktemp("publish")
    llama = random_llama(root / "llama", tokenizer_from=zoo.tokenizer, vocab_size=1024)
    compress_rps(llama, root / "rps", budget=0.5, device="cpu")
    data = root / "text.txt"
    data.write_text((zoo.root / "data" / "general.calib.txt").read_text()[:20000])
    return llama, root / "rps", data


def _copy(src, tmp_path, name):
    dst = tmp_path / "in" / name
    shutil.copytree(src, dst)
    return dst


def diverging_fold(models, tmp_path):
    llama, rps, data = models
    return ["fold", llama, "-o", tmp_path / "out", "--data", data, "--remove", "0.5", "--max-tokens", "2048",
            "--seq-len", "64", "--heal-steps", "2", "--heal-lr", HUGE_LR, "--device", "cpu", "--quiet"], "fold"


def diverging_compress(models, tmp_path):
    llama, rps, data = models
    return ["compress", "rps", llama, "-o", tmp_path / "out", "--budget", "0.5", "--data", data, "--seq-len", "64",
            "--heal-steps", "2", "--lr", HUGE_LR, "--device", "cpu", "--quiet"], "compress"


def export_inf_folded(models, tmp_path):
    folded = _copy(models[0], tmp_path, "folded")
    nan_at(folded, "model.layers.0.mlp.down_proj.weight", float("inf"))
    set_config(folded, weightsmith={"format": "folded", "groups": [[0, 1]], "block_prefix": "model.layers.",
                                    "kept": [0, 1], "source_layers": 2})
    return ["export", folded, "-o", tmp_path / "out", "--quiet"], "export"


def export_nan_rps(models, tmp_path):
    rps = _copy(models[1], tmp_path, "rps")
    nan_at(rps, "rps.memory")
    return ["export", rps, "-o", tmp_path / "out", "--quiet"], "export"


CASES = [diverging_fold, diverging_compress, export_inf_folded, export_nan_rps]


@pytest.mark.parametrize("case", CASES, ids=lambda f: f.__name__)
def test_a_stage_never_publishes_a_non_finite_tensor(case, models, tmp_path, capsys, monkeypatch):
    args, stage = case(models, tmp_path)
    before = snapshot(tmp_path)
    proc = cli(capsys, monkeypatch, *args)
    refused(proc, f"{stage} produced tensor", "NaN/inf", "never published", str(tmp_path / "out"))
    assert snapshot(tmp_path) == before  # no OUT, no temp folder, inputs untouched


def test_the_check_covers_every_writer_inside_an_output_folder_and_only_there(tmp_path):
    bad = {"w": torch.tensor([1.0, float("-inf")])}
    with pytest.raises(WeightsmithError, match="tensor 'w' holding 1 NaN/inf"):
        with output_folder(tmp_path / "out", stage="a stage") as tmp:
            save_state_dict({"fine": torch.ones(2)}, tmp)
            (tmp / "nested").mkdir()
            save_state_dict(bad, tmp / "nested")
    assert list(tmp_path.iterdir()) == []
    (tmp_path / "scratch").mkdir()
    save_state_dict(bad, tmp_path / "scratch")  # outside an output folder (a test fixture, a cache): written
    with output_folder(tmp_path / "out", values_checked=True) as tmp:  # what merge's own checks let through
        save_state_dict(bad, tmp)
    assert (tmp_path / "out" / "model.safetensors").is_file()


# a stage's config.json that does not fit the tensors it wrote: (config edit, tensor to drop, words)
MISFITS = {
    "one-layer-too-many": ({"num_hidden_layers": 3}, None, "none for layer 2"),
    "wider-mlp-than-written": ({"intermediate_size": 96}, None, "has shape [64, 32] but config.json makes it [96, 32]"),
    "head-not-written": ({}, "lm_head.weight", "'lm_head.weight' but the folder lacks it"),
    "folded-group-past-the-blocks": ({"num_hidden_layers": 4, "weightsmith": {
        "format": "folded", "groups": [[0, 1], [2, 3]], "block_prefix": "model.layers."}}, None, "none for layer 2"),
}


@pytest.mark.parametrize("case", list(MISFITS))
def test_a_config_that_does_not_fit_the_written_tensors_is_never_published(case, models, tmp_path):
    from weightsmith.checkpoint import Checkpoint, write_config

    changes, dropped, words = MISFITS[case]
    ckpt = Checkpoint(models[0])
    state = {n: t for n, t in ckpt.state_dict().items() if n != dropped}
    with pytest.raises(WeightsmithError) as err:
        with output_folder(tmp_path / "out", stage="a stage") as tmp:
            save_state_dict(state, tmp)
            write_config(tmp, {**ckpt.config, **changes})
    assert f"a stage wrote a model that is not exactly its tensors, so {tmp_path / 'out'} was not written" in str(
        err.value) and words in str(err.value), err.value
    assert list(tmp_path.iterdir()) == []
