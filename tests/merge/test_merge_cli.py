"""``weightsmith merge`` flags -> the exact library call (merge patched), mergekit-yaml's options, the
registry-generated help and --list-methods, and refusals in one line with exit 2."""
from __future__ import annotations

import dataclasses
import json
import subprocess
import sys

import pytest
from typer.testing import CliRunner

import weightsmith.merge as merge_pkg
from weightsmith.cli import app
from weightsmith.merge import all_methods
from weightsmith.merge.recipe import ModelEntry

BASE = ["merge", "--method", "ties", "--base", "B", "--model", "M1", "--model", "M2", "--out", "O"]
DEFAULTS = dict(device="auto", dtype=None, out_shard_size=5 * 10**9, seed=0, allow_crimes=False, force=False,
                copy_tokenizer=True, model_card=True, allow_nonfinite=False)


@pytest.fixture
def calls(monkeypatch):
    seen = []

    def fake(recipe, out, opts, **kwargs):  # the run options arrive as one MergeOptions: seen as keywords here
        seen.append((recipe, str(out), {**dataclasses.asdict(opts), **kwargs}))
        return {"out": str(out), "method": recipe.method, "inputs": recipe.inputs, "notes": []}
    monkeypatch.setattr(merge_pkg, "merge", fake)
    # model names here are placeholders: they reach the recipe as given (resolution has its own tests)
    monkeypatch.setattr("weightsmith.checkpoint.sources.resolve_model", lambda ref, **_: ref)
    return seen


def run(args):
    return CliRunner().invoke(app, args, catch_exceptions=False)


# flag(s) -> what the recipe or the call must carry: ("param", name, value) a global parameter,
# ("models", name, [values]) per-model, ("kw", name, value) a keyword of merge(), ("recipe", attr, value)
CASES = [
    (["--weight", "0.3", "--weight", "0.7"], ("models", "weight", [0.3, 0.7])),
    (["--weight", "0.4"], ("param", "weight", 0.4)),
    (["--density", "0.2", "--density", "0.6"], ("models", "density", [0.2, 0.6])),
    (["--gamma", "0.05"], ("param", "gamma", 0.05)),
    (["--lambda", "0.7"], ("param", "lambda", 0.7)),
    (["--t", "0.25"], ("param", "t", 0.25)),
    (["--normalize"], ("param", "normalize", True)),
    (["--no-normalize"], ("param", "normalize", False)),
    (["--rescale", "l1"], ("param", "rescale", "l1")),
    (["--trim", "tensor"], ("param", "trim", "tensor")),
    (["--mask", "tensor"], ("param", "mask", "tensor")),
    (["--compat", "mergekit"], ("param", "compat", "mergekit")),
    (["--filter-wise"], ("param", "filter_wise", True)),
    (["--metric", "step"], ("param", "metric", "step")),
    (["--p", "2"], ("param", "p", 2.0)),
    (["--metric-value", "1.5", "--metric-value", "2.5"], ("models", "metric_value", [1.5, 2.5])),
    (["--data", "d.txt"], ("param", "data", "d.txt")),
    (["--width", "1.5"], ("param", "width", 1.5)),
    (["--labelled", "l.jsonl"], ("param", "labelled", "l.jsonl")),
    (["--max-tokens", "99"], ("param", "max_tokens", 99)),
    (["--param", "int8_mask=true"], ("param", "int8_mask", True)),
    (["--dtype", "bfloat16"], ("kw", "dtype", "bfloat16")),
    (["--device", "cpu"], ("kw", "device", "cpu")),
    (["--no-cuda"], ("kw", "device", "cpu")),
    (["--cuda"], ("kw", "device", "cuda")),
    (["--out-shard-size", "1B"], ("kw", "out_shard_size", 10**9)),
    (["--seed", "7"], ("kw", "seed", 7)),
    (["--random-seed", "8"], ("kw", "seed", 8)),
    (["--allow-crimes"], ("kw", "allow_crimes", True)),
    (["--force"], ("kw", "force", True)),
    (["--no-copy-tokenizer"], ("kw", "copy_tokenizer", False)),
    (["--copy-tokenizer"], ("kw", "copy_tokenizer", True)),
    (["--no-write-model-card"], ("kw", "model_card", False)),
    (["--write-model-card"], ("kw", "model_card", True)),
    (["--allow-nonfinite"], ("kw", "allow_nonfinite", True)),
    (["--no-allow-crimes"], ("kw", "allow_crimes", False)),
    (["--no-filter-wise"], ("param", "filter_wise", False)),
    (["-j", "1"], ("kw", "device", "auto")),
    (["--lazy-unpickle"], ("kw", "device", "auto")),
    (["--unsafe-truncate-embeddings"], ("kw", "device", "auto")),
    (["--async-write"], ("kw", "device", "auto")),
    (["--safe-serialization"], ("kw", "device", "auto")),
    (["--num-threads", "1"], ("kw", "device", "auto")),
    (["--quiet"], ("kw", "progress", None)),
]


@pytest.mark.parametrize("flags, want", CASES, ids=[" ".join(f) for f, _ in CASES])
def test_each_flag_maps_to_the_library_call(flags, want, calls):
    result = run(BASE + flags)
    assert result.exit_code == 0, result.output
    (recipe, out, kwargs), = calls
    assert out == "O" and recipe.method == "ties" and recipe.base_model == "B"
    kind, name, value = want
    if kind == "param":
        assert recipe.parameters[name] == value
    elif kind == "models":
        assert [m.parameters[name] for m in recipe.models] == value
    else:
        assert kwargs[name] == value
        expected = {**DEFAULTS, name: value}
        assert {k: kwargs[k] for k in DEFAULTS} == {k: expected[k] for k in DEFAULTS}


def test_no_flags_gives_the_defaults(calls):
    assert run(BASE).exit_code == 0
    (recipe, _, kwargs), = calls
    assert recipe.models == [ModelEntry("M1"), ModelEntry("M2")] and recipe.parameters == {}
    assert {k: kwargs[k] for k in DEFAULTS} == DEFAULTS


def test_recipe_and_output_as_mergekit_yaml_positional_arguments(calls, tmp_path):
    (tmp_path / "r.yml").write_text("merge_method: linear\nmodels:\n  - model: a\n  - model: b\ndtype: bfloat16\n"
                                    "out_dtype: float32\n")
    assert run(["merge", str(tmp_path / "r.yml"), str(tmp_path / "o"), "--weight", "0.5"]).exit_code == 0
    (recipe, out, _), = calls
    assert out == str(tmp_path / "o") and recipe.parameters == {"weight": 0.5}
    assert (recipe.dtype, recipe.out_dtype) == ("bfloat16", "float32")


def _cli(*args):
    proc = subprocess.run([sys.executable, "-m", "weightsmith", *args], capture_output=True, text=True,
                          env={"PATH": "/usr/bin:/bin", "HF_HUB_OFFLINE": "1"})
    return proc.returncode, proc.stdout, proc.stderr


@pytest.mark.parametrize("args, message", [
    (["--trust-remote-code"], "--trust-remote-code (a mergekit-yaml option) has no meaning"),
    (["--gpu-rich"], "--gpu-rich (a mergekit-yaml option)"),
    (["-v"], "-v (a mergekit-yaml option)"),
    (["--no-such-flag"], "No such option: --no-such-flag"),
    (["--out-shard-size", "1"], "shards under 1KB are refused"),
    (["--out-shard-size", "2 parsecs"], "not understood"),
    (["--cuda", "--device", "cpu"], "not both"),
])
def test_refusals_are_one_line_exit_2(args, message, tmp_path):
    (tmp_path / "r.yml").write_text("merge_method: linear\nmodels:\n  - model: a\n  - model: b\n")
    code, out, err = _cli("merge", str(tmp_path / "r.yml"), str(tmp_path / "o"), *args)
    assert code == 2, err
    assert message in err and len(err.strip().splitlines()) == 1 and "Traceback" not in err


def test_help_and_list_methods_come_from_the_registry():
    names = sorted(all_methods())
    result = run(["merge", "--help"])
    assert result.exit_code == 0
    for name in names:
        assert name in result.output
    listed = json.loads(run(["merge", "--list-methods", "--json"]).output)
    assert [m["name"] for m in listed] == names
    ties = next(m for m in listed if m["name"] == "ties")
    density = next(p for p in ties["params"] if p["name"] == "density")
    assert density == {"name": "density", "scope": "model", "kind": "float", "default": 1.0, "range": [0.0, 1.0],
                       "help": density["help"]}
    trim = next(p for p in ties["params"] if p["name"] == "trim")
    assert trim["choices"] == ["model", "tensor"] and trim["mergekit_default"] == "tensor"
    table = run(["merge", "--list-methods"]).output
    assert "pleas" in table and "width" in table


def _mergekit_switch_offs():
    from mergekit.scripts.run_yaml import main as mergekit_yaml

    return [form for p in mergekit_yaml.params for form in getattr(p, "secondary_opts", ())]


@pytest.mark.parametrize("form", _mergekit_switch_offs())
def test_every_no_form_of_a_mergekit_yaml_switch_is_accepted(form, calls):
    """A copied mergekit-yaml command line never stops at ``--no-X``: it asks for what weightsmith does anyway, except
    ``--no-safe-serialization`` (pickle output), refused by name."""
    result = CliRunner().invoke(app, BASE + [form])
    if form == "--no-safe-serialization":
        assert result.exit_code != 0 and "writes safetensors only" in str(result.exception) + result.output
        return
    assert result.exit_code == 0, result.output
    assert len(calls) == 1


def test_the_method_flags_are_the_registrys_parameters():
    """One flag per parameter a method declares, repeatable exactly where some method takes it per model."""
    from weightsmith.cli.merge_cmd import MergeFlags

    declared = [p for m in all_methods().values() for p in m.params]
    flags = {f.removesuffix("_") for f in (*MergeFlags.PER_MODEL, *MergeFlags.GLOBAL)}
    assert flags == {p.name for p in declared}
    assert {f.removesuffix("_") for f in MergeFlags.PER_MODEL} == {p.name for p in declared if p.scope == "model"}


def test_pleas_parameters_are_the_pleas_command_options():
    from weightsmith.errors import OptionError
    from weightsmith.stage_options import PleasOptions

    params = {p.name: p for p in all_methods()["pleas"].params}
    specs = PleasOptions.specs()
    assert set(params) == set(specs) - {"out_shard_size"}
    assert all((p.low, p.high, p.choices or None) == (specs[n].lo, specs[n].hi, specs[n].choices)
               for n, p in params.items())
    with pytest.raises(OptionError, match="seq_len"):
        params["seq_len"].check(1, "recipe")
