"""Stage options declared once: the checks, the typed errors, and their wording on the CLI and in a pipeline."""
from __future__ import annotations

from pathlib import Path

import pytest
import yaml
from typer.testing import CliRunner

from weightsmith.cli import app
from weightsmith.errors import InvalidChoice, MissingOption, OptionError, OutOfRange, UnknownOption, WeightsmithError
from weightsmith.options import Options, option
from weightsmith.pipeline import STAGES, load_pipeline
from weightsmith.stage_options import STAGE_OPTIONS, AlignOptions, EvalOptions, PleasOptions, RpsOptions


class Shrink(Options):
    ratio: float = option(0.5, lo=0, hi=1, lo_open=True, help="Fraction kept.")
    mode: str = option("row", choices=("row", "tensor"), help="Unit.")
    data: Path | None = option(None, path=True, help="Text.")
    steps: int = option(0, lo=0, help="Steps.")

    def check(self) -> None:
        if self.steps and self.data is None:
            raise MissingOption("data", "needed when {0} > 0", ("steps",))


@pytest.mark.parametrize("values, error, text", [
    ({"ratio": 0}, OutOfRange, "ratio: 0 is out of range; it must be in (0, 1]"),
    ({"ratio": 1.5}, OutOfRange, "ratio: 1.5 is out of range; it must be in (0, 1]"),
    ({"mode": "col"}, InvalidChoice, "mode: 'col' is not one of row, tensor"),
    ({"steps": -1}, OutOfRange, "steps: -1 is out of range; it must be in [0, inf)"),
    ({"steps": 3}, MissingOption, "data: needed when steps > 0"),
    ({"rate": 3}, UnknownOption, "rate: no such option; the options are ratio, mode, data, steps"),
    ({"ratio": "half"}, OptionError, "ratio: 'half' is not a number"),
])
def test_each_bad_value_raises_its_typed_error_named_by_the_parameter(values, error, text):
    with pytest.raises(error) as err:
        Shrink.build(None, **values)
    assert str(err.value) == text and err.value.param == text.split(":")[0]


def test_bounds_are_inclusive_unless_declared_open():
    assert Shrink(ratio=1).ratio == 1 and Shrink(steps=0).steps == 0
    assert Shrink(ratio=1e-9).ratio == 1e-9


def test_build_overrides_an_existing_object_and_revalidates():
    base = Shrink(mode="tensor")
    assert Shrink.build(base, ratio=0.25) == Shrink(mode="tensor", ratio=0.25)
    assert Shrink.build(base) is base
    with pytest.raises(OutOfRange):
        Shrink.build(base, ratio=2)


def test_path_options_become_paths_and_to_dict_writes_them_as_text():
    o = Shrink(data="x.txt", steps=1)
    assert o.data == Path("x.txt") and o.to_dict()["data"] == "x.txt"


def test_render_words_the_subject_and_the_other_options_for_each_user():
    err = MissingOption("data", "needed when {0} > 0", ("steps",))
    assert err.render(lambda p: "--" + p.replace("_", "-")) == "--data: needed when --steps > 0"
    assert err.render(lambda p: f"params.{p}", subject="stage 's', key 'params.data'") == \
        "stage 's', key 'params.data': needed when params.steps > 0"
    loose = OptionError(None, "nothing to do: give {0}", ("heal_steps",))
    assert loose.render(lambda p: "--" + p.replace("_", "-")) == "nothing to do: give --heal-steps"


def test_required_options_must_be_given():
    with pytest.raises(MissingOption, match="^data: required$"):
        PleasOptions.build(None, width=1.5)


def test_stage_options_share_one_name_per_concept():
    """No stage spells a concept its own way (seq/batch/max_shard_size were the old drift)."""
    names = {n for cls in STAGE_OPTIONS.values() for n in cls.specs()}
    assert not names & {"seq", "batch", "max_shard_size", "shard_size"}
    helps: dict[str, set[str]] = {}
    for stage, cls in STAGE_OPTIONS.items():
        if stage == "merge":  # merge's sizes are also mergekit's parameter counts (5B), and its help says so
            continue
        for n, s in cls.specs().items():
            helps.setdefault(n, set()).add(s.help)
    assert len(helps["out_shard_size"]) == 1


def test_pipeline_schema_comes_from_the_options_class():
    for name, cls in STAGE_OPTIONS.items():
        stage = STAGES.get("compress" if name == "compress" else name)
        if stage is None or stage.options is None:
            continue
        offered = {n for n, s in cls.specs().items() if s.pipeline}
        assert set(stage.parameters()) == offered
        assert set(stage.paths) == {n for n, s in cls.specs().items() if s.path}
        for n in cls.required():
            assert stage.parameters()[n].default is stage.parameters()[n].empty


# -- the same bad value on the command line and in a pipeline ------------------------------------------------

def _cli_error(args: list[str]) -> str:
    res = CliRunner().invoke(app, [str(a) for a in args])
    assert isinstance(res.exception, WeightsmithError), res.output
    assert not isinstance(res.exception, OptionError)  # reworded with flags before it leaves the command
    return str(res.exception)


def _pipeline_error(tmp_path: Path, stage: dict) -> str:
    path = tmp_path / "p.yaml"
    path.write_text(yaml.safe_dump({"stages": [{"name": "s", **stage}]}, sort_keys=False))
    with pytest.raises(WeightsmithError) as err:
        load_pipeline(path)
    return str(err.value)


@pytest.mark.parametrize("command, stage, flags, params, cli_text, pipeline_text", [
    (["compress", "rps", "A"], "compress", ["--mapping", "lsh"], {"mapping": "lsh"},
     "--mapping: 'lsh' is not one of stable, roast",
     "stage 's', key 'params.mapping': 'lsh' is not one of stable, roast"),
    (["compress", "rps", "A"], "compress", ["--budget", "5"], {"budget": 5},
     "--budget: 5.0 is out of range; it must be in (0, 4]",
     "stage 's', key 'params.budget': 5 is out of range; it must be in (0, 4]"),
    (["compress", "rps", "A"], "compress", ["--heal-steps", "3"], {"heal_steps": 3},
     "--data: healing (--heal-steps > 0) needs text to train on",
     "stage 's', key 'params.data': healing (params.heal_steps > 0) needs text to train on"),
    (["align", "A", "A"], "align", ["--method", "activation"], {"method": "activation"},
     "--data: activation matching (--method activation) needs calibration text",
     "stage 's', key 'params.data': activation matching (params.method activation) needs calibration text"),
    (["align", "A", "A"], "align", ["--metric", "cosine"], {"metric": "cosine"},
     "--metric: 'cosine' is not one of euclidean, correlation",
     "stage 's', key 'params.metric': 'cosine' is not one of euclidean, correlation"),
    (["eval", "A"], "eval", ["--batch-size", "0", "--data", "T"], {"batch_size": 0, "data": "T"},
     "--batch-size: 0 is out of range; it must be in [1, inf)",
     "stage 's', key 'params.batch_size': 0 is out of range; it must be in [1, inf)"),
    (["eval", "A"], "eval", [], {},
     "nothing to measure: give --data (text, for perplexity) and/or --labelled (labelled file, for accuracy)",
     "stage 's': nothing to measure: give params.data (text, for perplexity) and/or params.labelled (labelled "
     "file, for accuracy)"),
    (["eval", "A"], "eval", ["--dtype", "int8", "--data", "T"], {"dtype": "int8", "data": "T"},
     "--dtype: 'int8' is not one of float32, bfloat16, float16, fp32, bf16, fp16",
     "stage 's', key 'params.dtype': 'int8' is not one of float32, bfloat16, float16, fp32, bf16, fp16"),
    (["analyze", "A"], "analyze", ["--remove", "1", "--data", "T"], {"remove": 1, "data": "T"},
     "--remove: 1.0 is out of range; it must be in [0, 1)",
     "stage 's', key 'params.remove': 1 is out of range; it must be in [0, 1)"),
    (["fold", "A"], "fold", ["--importance", "random", "--data", "T"], {"importance": "random", "data": "T"},
     "--importance: 'random' is not one of loss, gates, bi, angular",
     "stage 's', key 'params.importance': 'random' is not one of loss, gates, bi, angular"),
    (["fold", "A"], "fold", ["--share", "two", "--data", "T"], {"share": "two", "data": "T"},
     "--share: 'two' must be a group size or a comma list of sizes, e.g. 2 or 1,2,2",
     "stage 's', key 'params.share': 'two' must be a group size or a comma list of sizes, e.g. 2 or 1,2,2"),
    (["fold", "A"], "fold", ["--heal-tail", "0", "--data", "T"], {"heal_tail": 0, "data": "T"},
     "--heal-tail: 0 is out of range; it must be in [1, inf)",
     "stage 's', key 'params.heal_tail': 0 is out of range; it must be in [1, inf)"),
])
def test_the_same_bad_value_is_worded_for_the_cli_and_for_the_pipeline(tiny_llama, tmp_path, command, stage, flags,
                                                                       params, cli_text, pipeline_text):
    model = tiny_llama()
    text = tmp_path / "t.txt"
    text.write_text("hello world " * 50)
    sub = {"A": model, "T": text}
    args = [*(sub.get(a, a) for a in command),
            *(["-o", tmp_path / "out"] if stage in ("compress", "align", "fold") else []),
            *(sub.get(a, a) for a in flags)]
    assert _cli_error(args) == cli_text
    entry = {"stage": stage, "inputs": [str(model)] * (2 if stage == "align" else 1),
             "params": {k: str(sub.get(v, v)) if v == "T" else v for k, v in params.items()}}
    assert _pipeline_error(tmp_path, entry) == pipeline_text
    assert not (tmp_path / "out").exists()


def test_dtype_choices_are_the_ones_the_library_resolves():
    from weightsmith.device import DTYPES
    from weightsmith.options import DTYPES as CHOICES

    assert set(CHOICES) == set(DTYPES)


def test_options_classes_match_the_library_defaults():
    assert RpsOptions().lr is None and RpsOptions().batch_size == 16 and RpsOptions().seq_len == 64
    assert AlignOptions().seq_len == PleasOptions.default("seq_len") == 128
    assert EvalOptions.default("batch_size") == 8


def test_an_option_error_raised_while_a_stage_runs_is_worded_for_each_user(tiny_llama, tmp_path):
    """The model has no tokenizer: the library asks for one by its option name, worded per user."""
    from weightsmith.pipeline import run_pipeline

    model = tiny_llama()
    text = tmp_path / "t.txt"
    text.write_text("hello world " * 50)
    cli = _cli_error(["eval", model, "--data", text])
    assert cli.endswith("give a tokenizer folder by --tokenizer")
    path = tmp_path / "p.yaml"
    path.write_text(yaml.safe_dump({"workdir": str(tmp_path / "w"), "stages": [
        {"name": "s", "stage": "eval", "input": str(model), "params": {"data": str(text)}}]}))
    with pytest.raises(WeightsmithError) as err:
        run_pipeline(load_pipeline(path), device="cpu")
    assert "give a tokenizer folder by params.tokenizer" in str(err.value) and "--" not in str(err.value)


def test_a_declared_flag_is_the_one_the_cli_error_names():
    from weightsmith.cli.options import cli_wording

    class Odd(Options):
        seq_len: int = option(8, lo=2, flag="--window", help="Tokens.")

    with pytest.raises(OutOfRange) as err:
        Odd(seq_len=1)
    assert str(cli_wording(err.value, Odd)) == "--window: 1 is out of range; it must be in [2, inf)"
    assert str(cli_wording(err.value)) == "--seq-len: 1 is out of range; it must be in [2, inf)"


@pytest.mark.parametrize("stage, params, cli_flags, cli_text, pipeline_text", [
    ("fold", {"remove": 0.9}, ["--remove", "0.9"], "--remove: 0.9 would remove all 2 blocks",
     "key 'params.remove': 0.9 would remove all 2 blocks"),
    ("fold", {"seq_len": 4096}, ["--seq-len", "4096"], "--seq-len: 4096 exceeds the model's",
     "key 'params.seq_len': 4096 exceeds the model's"),
])
def test_a_fold_value_refused_once_the_model_is_read_is_worded_for_each_user(tiny_llama, tmp_path, stage, params,
                                                                             cli_flags, cli_text, pipeline_text):
    """Checks that need the model (its block count, its positions) run inside the stage; the wording follows."""
    from weightsmith.pipeline import run_pipeline

    model = tiny_llama()
    text = tmp_path / "t.txt"
    text.write_text("hello world " * 50)
    cli = _cli_error([stage, model, "-o", tmp_path / "out", "--data", text, "--device", "cpu", *cli_flags])
    assert cli.startswith(cli_text) and "params." not in cli
    path = tmp_path / "p.yaml"
    path.write_text(yaml.safe_dump({"workdir": str(tmp_path / "w"), "stages": [
        {"name": "s", "stage": stage, "input": str(model), "params": {"data": str(text), **params}}]}))
    with pytest.raises(WeightsmithError) as err:
        run_pipeline(load_pipeline(path), device="cpu")
    assert pipeline_text in str(err.value) and "--" not in str(err.value)
    assert not (tmp_path / "out").exists()


# -- merge: a method parameter's bad value, from flags, from a recipe file, from a pipeline ------------------

MERGE_BAD = [
    (["--density", "1.5"], {"parameters": {"density": 1.5}},
     "--density: 1.5 is out of range; it must be in [0, 1]",
     "key 'params.parameters.density': 1.5 is out of range; it must be in [0, 1]"),
    (["--density", "0.5", "--density", "1.5"], {"model_parameters": [{"density": 0.5}, {"density": 1.5}]},
     "--density: 1.5 is out of range; it must be in [0, 1]",
     "key 'params.model_parameters[1].density': 1.5 is out of range; it must be in [0, 1]"),
    (["--trim", "row"], {"parameters": {"trim": "row"}},
     "--trim: 'row' is not one of model, tensor",
     "key 'params.parameters.trim': 'row' is not one of model, tensor"),
    (["--param", "int8_mask=3"], {"parameters": {"int8_mask": 3}},
     "--param int8_mask: must be true or false, got 3",
     "key 'params.parameters.int8_mask': must be true or false, got 3"),
    (["--out-shard-size", "2 parsecs"], {"out_shard_size": "2 parsecs"},
     "--out-shard-size: '2 parsecs' not understood",
     "key 'params.out_shard_size': '2 parsecs' not understood"),
]


@pytest.mark.parametrize("flags, params, cli_text, pipeline_text", MERGE_BAD, ids=[" ".join(c[0]) for c in MERGE_BAD])
def test_the_same_bad_merge_value_is_worded_for_the_cli_and_for_the_pipeline(tiny_llama, tmp_path, flags, params,
                                                                             cli_text, pipeline_text):
    from weightsmith.pipeline import run_pipeline

    base, a, b = tiny_llama("base"), tiny_llama("a", seed=1), tiny_llama("b", seed=2)
    cli = _cli_error(["merge", "--method", "ties", "--base", base, "--model", a, "--model", b, "-o", tmp_path / "out",
                      *flags])
    assert cli.startswith(cli_text) and "params." not in cli and "recipe" not in cli
    path = tmp_path / "p.yaml"
    path.write_text(yaml.safe_dump({"workdir": str(tmp_path / "w"), "stages": [
        {"name": "m", "stage": "merge", "inputs": [str(a), str(b)],
         "params": {"method": "ties", "base_model": str(base), **params}}]}))
    with pytest.raises(WeightsmithError) as err:
        run_pipeline(load_pipeline(path), device="cpu")
    assert pipeline_text in str(err.value) and "--" not in str(err.value)
    assert not (tmp_path / "out").exists()


def test_a_bad_value_in_a_recipe_file_keeps_the_recipe_wording_on_the_cli(tiny_llama, tmp_path):
    base, a = tiny_llama("base"), tiny_llama("a", seed=1)
    recipe = tmp_path / "r.yml"
    recipe.write_text(yaml.safe_dump({"merge_method": "ties", "base_model": str(base),
                                      "models": [{"model": str(a), "parameters": {"density": 1.5}}]}))
    cli = _cli_error(["merge", recipe, "-o", tmp_path / "out"])
    assert cli.startswith(f"recipe: model {a}: ") and "parameter 'density': 1.5 is out of range" in cli
    assert "--" not in cli
    fixed = _cli_error(["merge", recipe, "-o", tmp_path / "out", "--density", "2"])  # the flag overrides the file
    assert fixed == "--density: 2.0 is out of range; it must be in [0, 1]"


def test_a_fix_naming_an_option_is_worded_by_each_reader_and_braces_in_the_problem_survive():
    from weightsmith.cli.options import flag
    from weightsmith.errors import needs_option, reworded

    err = needs_option("out{1} already exists", "; {0} replaces it", "force")
    assert str(err) == "out{1} already exists; force replaces it"
    assert err.render(flag) == "out{1} already exists; --force replaces it"
    # inside a longer message (a pipeline's stage failure), the option still waits for its reader
    outer = reworded(err, prefix="stage '{s}' failed: ")
    assert isinstance(outer, OptionError) and outer.render(flag) == "stage '{s}' failed: out{1} already exists; " \
                                                                   "--force replaces it"
    # a reader that words every option leaves a plain message
    done = reworded(MissingOption("data", "needed when {0} > 0", ("steps",)), lambda p: f"params.{p}")
    assert type(done) is WeightsmithError and str(done) == "params.data: needed when params.steps > 0"
