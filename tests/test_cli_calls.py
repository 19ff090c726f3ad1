"""Every flag of eval, analyze, fold, compress rps, align, pleas, export, inspect and zoo reaches the library call:
the library function is patched and the exact call asserted (no model is loaded; milliseconds each)."""
from __future__ import annotations

from pathlib import Path
from unittest import mock

import pytest
from typer.testing import CliRunner

from weightsmith.cli import app
from weightsmith.stage_options import (AlignOptions, AnalyzeOptions, EvalOptions, ExportOptions, ExtractLoraOptions,
                                      FoldOptions, MoeOptions, PleasOptions, RpsOptions)


@pytest.fixture(autouse=True)
def _no_bars(monkeypatch):
    monkeypatch.setenv("WEIGHTSMITH_PROGRESS", "0")  # no progress output: progress=None in every call
    # model names here are placeholders: they reach the library as the paths given (resolution has its own tests)
    monkeypatch.setattr("weightsmith.checkpoint.sources.resolve_model", lambda ref, **_: Path(ref))


def invoke(*args) -> None:
    res = CliRunner().invoke(app, [str(a) for a in args], catch_exceptions=False)
    assert res.exit_code == 0, res.output


# -- eval ------------------------------------------------------------------------------------------------------

def test_eval_defaults():
    with mock.patch("weightsmith.eval.evaluate", return_value=[]) as fn:
        invoke("eval", "m1", "m2", "--data", "d.txt", "--json")
    fn.assert_called_once_with([Path("m1"), Path("m2")], EvalOptions(data=Path("d.txt")), device="auto",
                               allow_pickle=False, progress=None)


def test_eval_every_flag():
    with mock.patch("weightsmith.eval.evaluate", return_value=[]) as fn:
        invoke("eval", "m", "--data", "d.txt", "--labelled", "l.csv", "--tokenizer", "tok", "--context", "64",
               "--stride", "16", "--max-tokens", "500", "--batch-size", "3", "--dtype", "bfloat16", "--device", "cpu",
               "--allow-pickle", "--quiet", "--json")
    fn.assert_called_once_with([Path("m")], EvalOptions(data=Path("d.txt"), labelled=Path("l.csv"),
                                                        tokenizer=Path("tok"), context=64, stride=16, max_tokens=500,
                                                        batch_size=3, dtype="bfloat16"),
                               device="cpu", allow_pickle=True, progress=None)


# -- analyze ---------------------------------------------------------------------------------------------------

def test_analyze_defaults():
    with mock.patch("weightsmith.fold.analyze.analyze", return_value={}) as fn:
        invoke("analyze", "m", "--data", "d.txt", "--json")
    fn.assert_called_once_with(Path("m"), None, AnalyzeOptions(data=Path("d.txt")), device="auto", force=False,
                               progress=None)


def test_analyze_every_flag():
    with mock.patch("weightsmith.fold.analyze.analyze", return_value={}) as fn:
        invoke("analyze", "m", "--data", "d.txt", "-o", "out", "--remove", "0.5", "--seq-len", "32", "--max-tokens",
               "100", "--batch-size", "2", "--tokenizer", "tok", "--device", "cpu", "--force", "--quiet", "--json",
               "--dtype", "bfloat16")
    fn.assert_called_once_with(Path("m"), Path("out"), AnalyzeOptions(
        data=Path("d.txt"), remove=0.5, seq_len=32, max_tokens=100, batch_size=2, tokenizer=Path("tok"),
        dtype="bfloat16"), device="cpu", force=True, progress=None)
    assert AnalyzeOptions.required() == ["data"]


# -- fold ------------------------------------------------------------------------------------------------------

FOLD_RESULT = {"rank": 0, "scores": {}, "removed": [], "blocks": 2, "kept": [0, 1], "groups": [[0], [1]],
               "params_unique": 1, "params_original": 1, "seconds": {}}


def test_fold_defaults():
    with mock.patch("weightsmith.fold.stage.fold", return_value=FOLD_RESULT) as fn:
        invoke("fold", "m", "-o", "out", "--data", "d.txt", "--json")
    fn.assert_called_once_with(Path("m"), Path("out"), FoldOptions(data=Path("d.txt")), seed=0, device="auto",
                               force=False, progress=None)


def test_fold_every_flag():
    with mock.patch("weightsmith.fold.stage.fold", return_value=FOLD_RESULT) as fn:
        invoke("fold", "m", "-o", "out", "--data", "d.txt", "--remove", "0.5", "--share", "1,2", "--share-init",
               "middle", "--importance", "gates", "--gate-steps", "7", "--relax-rank", "4", "--heal-steps", "3",
               "--heal-lr", "0.01", "--heal-tail", "1", "--heal-lora", "8", "--seq-len", "32", "--max-tokens", "100",
               "--heal-max-tokens", "300", "--heal-pooled-weight", "5", "--heal-splice", "0.25",
               "--batch-size", "2", "--out-shard-size", "1GB", "--seed", "5", "--device", "cpu", "--force",
               "--quiet", "--trust-remote-code", "--json")
    fn.assert_called_once_with(Path("m"), Path("out"),
                               FoldOptions(data=Path("d.txt"), remove=0.5, share="1,2", share_init="middle",
                                           importance="gates", gate_steps=7, relax_rank=4, heal_steps=3, heal_lr=0.01,
                                           heal_tail=1, heal_lora=8, seq_len=32, max_tokens=100, heal_max_tokens=300,
                                           heal_pooled_weight=5.0, heal_splice=0.25, batch_size=2,
                                           out_shard_size="1GB"),
                               seed=5, device="cpu", force=True, progress=None)


def test_fold_seq_is_the_older_spelling_of_seq_len():
    with mock.patch("weightsmith.fold.stage.fold", return_value=FOLD_RESULT) as fn:
        invoke("fold", "m", "-o", "out", "--data", "d.txt", "--seq", "48", "--json")
    assert fn.call_args.args[2].seq_len == 48


def test_fold_prints_nothing_on_the_other_ranks():
    with mock.patch("weightsmith.fold.stage.fold", return_value={"rank": 1}):
        res = CliRunner().invoke(app, ["fold", "m", "-o", "out", "--data", "d.txt"], catch_exceptions=False)
    assert res.exit_code == 0 and res.output == ""


# -- compress rps ----------------------------------------------------------------------------------------------

def test_compress_rps_defaults():
    with mock.patch("weightsmith.compressor.rps.compress_rps", return_value={}) as fn:
        invoke("compress", "rps", "m", "-o", "out", "--json")
    fn.assert_called_once_with(Path("m"), Path("out"), RpsOptions(), device="auto", seed=0, force=False,
                               progress=None)


def test_compress_rps_every_projection_flag():
    with mock.patch("weightsmith.compressor.rps.compress_rps", return_value={}) as fn:
        invoke("compress", "rps", "m", "-o", "out", "--budget", "0.2", "--mapping", "roast", "--modules", "mlp",
               "--sharing", "module", "--tile", "32", "--heal-steps", "5", "--data", "d.txt", "--lr", "0.01",
               "--batch-size", "4", "--seq-len", "16", "--device", "cpu", "--seed", "3", "--force", "--quiet",
               "--json")
    fn.assert_called_once_with(Path("m"), Path("out"), RpsOptions(budget=0.2, mapping="roast", modules="mlp",
                                                                  sharing="module", tile=32, heal_steps=5,
                                                                  data=Path("d.txt"), lr=0.01, batch_size=4,
                                                                  seq_len=16),
                               device="cpu", seed=3, force=True, progress=None)


def test_compress_rps_from_config_flags_train():
    with mock.patch("weightsmith.compressor.rps.train_rps", return_value={}) as fn:
        invoke("compress", "rps", "--from-config", "cfg", "--train", "--train-steps", "7", "--tokenizer", "tok",
               "--data", "d.txt", "-o", "out", "--json")
    fn.assert_called_once_with(Path("cfg"), Path("out"), RpsOptions(from_config=Path("cfg"), train=True,
                                                                    train_steps=7, tokenizer=Path("tok"),
                                                                    data=Path("d.txt")),
                               device="auto", seed=0, force=False, progress=None)


def test_compress_rps_needs_a_model_or_a_config():
    res = CliRunner().invoke(app, ["compress", "rps", "-o", "out"])
    assert "give either MODEL" in str(res.exception)
    res = CliRunner().invoke(app, ["compress", "rps", "--from-config", "cfg", "-o", "out"])
    assert "add --train --data TEXT" in str(res.exception)


# -- align and pleas -------------------------------------------------------------------------------------------

def test_align_defaults():
    with mock.patch("weightsmith.merge.align.folders.align", return_value={}) as fn:
        invoke("align", "a", "b", "-o", "out", "--json")
    fn.assert_called_once_with(Path("a"), Path("b"), Path("out"), AlignOptions(), seed=0, device="auto", force=False,
                               progress=None)


def test_align_every_flag():
    with mock.patch("weightsmith.merge.align.folders.align", return_value={}) as fn:
        invoke("align", "a", "b", "-o", "out", "--method", "activation", "--data", "d.txt", "--metric",
               "correlation", "--max-tokens", "100", "--seq-len", "16", "--batch-size", "2", "--max-sweeps", "5",
               "--out-shard-size", "1GB", "--seed", "2", "--device", "cpu", "--force", "--quiet", "--json")
    fn.assert_called_once_with(Path("a"), Path("b"), Path("out"),
                               AlignOptions(method="activation", data=Path("d.txt"), metric="correlation",
                                            max_tokens=100, seq_len=16, batch_size=2, max_sweeps=5,
                                            out_shard_size="1GB"),
                               seed=2, device="cpu", force=True, progress=None)


def test_pleas_defaults():
    with mock.patch("weightsmith.merge.pleas_stage.pleas_merge", return_value={}) as fn:
        invoke("pleas", "a", "b", "--data", "d.txt", "-o", "out", "--json")
    fn.assert_called_once_with(Path("a"), Path("b"), PleasOptions(data=Path("d.txt")), out=Path("out"), seed=0,
                               device="auto", force=False, progress=None)


def test_pleas_every_flag():
    with mock.patch("weightsmith.merge.pleas_stage.pleas_merge", return_value={}) as fn:
        invoke("pleas", "a", "b", "--data", "d.txt", "-o", "out", "--width", "1.5", "--metric", "correlation",
               "--ridge", "0.01", "--no-least-squares", "--inputs", "original", "--max-tokens", "100", "--seq-len",
               "16", "--batch-size", "2", "--out-shard-size", "1GB", "--seed", "1", "--device", "cpu", "--force",
               "--quiet", "--json")
    fn.assert_called_once_with(Path("a"), Path("b"),
                               PleasOptions(data=Path("d.txt"), width=1.5, metric="correlation", ridge=0.01,
                                            least_squares=False, inputs="original", max_tokens=100, seq_len=16,
                                            batch_size=2, out_shard_size="1GB"),
                               out=Path("out"), seed=1, device="cpu", force=True, progress=None)


# -- export, inspect, zoo --------------------------------------------------------------------------------------

@pytest.mark.parametrize("flags, shard", [([], 5 * 10**9), (["--out-shard-size", "2GB", "--force", "--quiet"], 2 * 10**9)])
def test_export_flags(flags, shard):
    with mock.patch("weightsmith.export.export", return_value={"format": "rps"}) as fn:
        invoke("export", "m", "-o", "out", *flags, "--json")
    fn.assert_called_once_with(Path("m"), Path("out"), ExportOptions(out_shard_size=shard), force="--force" in flags,
                               progress=None)


def test_export_dispatches_to_the_folder_format_and_refuses_no_plain():
    from weightsmith.export import export

    module = mock.Mock()
    module.export_plain.return_value = {"tensors": 3}
    with mock.patch("weightsmith.export.folder_format", return_value="rps"), \
            mock.patch("weightsmith.export.format_module", return_value=module) as fmt:
        assert export("m", "out", out_shard_size=7000) == {"format": "rps", "tensors": 3}
    fmt.assert_called_once_with("rps")
    module.export_plain.assert_called_once_with("m", "out", out_shard_size=7000, force=False, progress=None)
    res = CliRunner().invoke(app, ["export", "m", "-o", "out", "--no-plain"])
    assert str(res.exception) == "--plain: off: the plain checkpoint is the one export there is"


@pytest.mark.parametrize("flags, kwargs", [([], {"allow_pickle": False, "tensors": False}),
                                           (["--tensors", "--allow-pickle"], {"allow_pickle": True, "tensors": True})])
def test_inspect_flags(flags, kwargs):
    with mock.patch("weightsmith.inspect.summarize", return_value={}) as fn:
        invoke("inspect", "m", *flags, "--json")
    fn.assert_called_once_with(Path("m"), **kwargs)


@pytest.mark.parametrize("flags, size, force", [([], "tiny", False),
                                                (["--size", "small", "--force", "-q"], "small", True)])
def test_zoo_build_flags(flags, size, force, tmp_path):
    zoo = mock.Mock(root=tmp_path, size=size, tokenizer=tmp_path / "tok", mwa_checkpoints=[], manifest={})
    zoo.model_names.return_value = []
    with mock.patch("weightsmith.zoo.build", return_value=zoo) as fn:
        invoke("zoo", "build", *flags, "--json")
    fn.assert_called_once_with(size, progress=None, force=force)


# -- extract-lora ----------------------------------------------------------------------------------------------

def test_extract_lora_defaults():
    with mock.patch("weightsmith.compressor.lora_extract.extract_lora", return_value={}) as fn:
        invoke("extract-lora", "ft", "--base", "b", "-o", "out", "--json")
    fn.assert_called_once_with(Path("ft"), Path("out"), ExtractLoraOptions(base=Path("b")), device="auto", seed=0,
                               force=False, progress=None)


def test_extract_lora_every_flag_in_mergekit_spelling():
    with mock.patch("weightsmith.compressor.lora_extract.extract_lora", return_value={}) as fn:
        invoke("extract-lora", "--model", "ft", "--base-model", "b", "--out-path", "out", "--max-rank", "16",
               "--rank", "auto", "--energy", "0.9", "--sv-epsilon", "0.01", "--no-distribute-scale", "--embed-lora",
               "--save-module", "lm_head", "--save-module", "norm", "-i", "layers", "-e", "mlp", "-e", "k_proj",
               "--skip-undecomposable", "--svd", "exact", "--data", "d.txt", "--max-tokens", "99", "--tokenizer",
               "tok", "--device", "cpu", "--seed", "3", "--force", "--quiet", "--json")
    fn.assert_called_once_with(
        Path("ft"), Path("out"),
        ExtractLoraOptions(base=Path("b"), max_rank=16, rank="auto", energy=0.9, sv_epsilon=0.01,
                           distribute_scale=False, embed_lora=True, save_module=["lm_head", "norm"],
                           include_regex=["layers"], exclude_regex=["mlp", "k_proj"], skip_undecomposable=True,
                           svd="exact", data=Path("d.txt"), max_tokens=99, tokenizer=Path("tok")),
        device="cpu", seed=3, force=True, progress=None)


# -- moe -------------------------------------------------------------------------------------------------------

MOE_INFO = {"architecture": "Mixtral", "experts": 2, "shared_experts": 0, "gate_mode": "random", "layers": 2,
            "tensors": 9, "seconds": 0.1, "degenerate_layers": []}


def test_moe_defaults():
    with mock.patch("weightsmith.merge.moe.build_moe", return_value=MOE_INFO) as fn:
        invoke("moe", "c.yml", "out")
    fn.assert_called_once_with(Path("c.yml"), Path("out"), MoeOptions(), device="auto", seed=0, force=False,
                               progress=None)


def test_moe_every_flag_in_mergekit_spelling():
    with mock.patch("weightsmith.merge.moe.build_moe", return_value=MOE_INFO) as fn:
        invoke("moe", "c.yml", "out", "--out-shard-size", "1B", "--no-copy-tokenizer", "--no-write-model-card",
               "--i-understand-this-is-not-useful-without-training", "--hidden-dtype", "float32", "--device", "cpu",
               "--seed", "4", "--force", "--quiet", "--json")
    fn.assert_called_once_with(Path("c.yml"), Path("out"),
                               MoeOptions(out_shard_size="1B", copy_tokenizer=False, model_card=False,
                                          allow_all_same=True, hidden_dtype="float32"),
                               device="cpu", seed=4, force=True, progress=None)


def test_moe_explain():
    report = {"experts_per_token": 2, "prompts": [{"prompt": "p", "tokens": 1, "shares": [[1.0, 1.0, 0.0]]}]}
    with mock.patch("weightsmith.merge.moe_router.explain_routing", return_value=report) as fn:
        invoke("moe", "--explain", "m", "--data", "p.txt")
    fn.assert_called_once_with(Path("m"), Path("p.txt"), device="auto", progress=None)
