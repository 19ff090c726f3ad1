"""Every option of every command, given text that format strings, regexes and encoders choke on, ends in one
line and exit status 2 (or a normal exit): user text is never read as a template (``errors._fill``)."""
from __future__ import annotations

import sys

import pytest
import typer

from weightsmith.cli import app, main
from weightsmith.errors import MissingOption, OptionError, needs_option

HOSTILE = ["{", "}", "{0}", "%s", "\udcff"]  # the last: a non-UTF-8 byte as Python receives it in argv


# typer may carry its own copy of click: parameters are told apart by what they are, not by class identity
def _commands(group, path: tuple[str, ...] = ()):
    for name, cmd in sorted(group.commands.items()):
        if hasattr(cmd, "commands"):
            yield from _commands(cmd, (*path, name))
        else:
            yield (*path, name), cmd


def _filler(param) -> str:
    descriptor = getattr(param, "type_descriptor", None)
    kind = getattr(descriptor, "annotation", None) or type(getattr(param, "type", None)).__name__
    if kind in (int, float, "IntParamType", "FloatParamType", "IntRange", "FloatRange"):
        return "1"
    return "/nonexistent/weightsmith-test"


def _is_option(p) -> bool:
    return p.param_type_name == "option"


def _cases():
    root = typer.main.get_command(app)
    for path, cmd in _commands(root):
        positional = [_filler(p) for p in cmd.params if p.param_type_name == "argument" and p.required]
        required = [(p.opts[0], _filler(p)) for p in cmd.params if _is_option(p) and p.required and not p.is_flag]
        for p in cmd.params:
            if _is_option(p) and not p.is_flag and not p.hidden and not p.count:
                yield pytest.param(path, positional, required, p.opts[0], id=f"{' '.join(path)} {p.opts[0]}")


@pytest.mark.parametrize("path, positional, required, option", list(_cases()))
def test_every_option_refuses_hostile_text_in_one_line(path, positional, required, option, capsys, monkeypatch):
    for value in HOSTILE:
        args = [*path, *positional, *[x for o, v in required if o != option for x in (o, v)], option, value]
        monkeypatch.setattr(sys, "argv", ["weightsmith", *args])
        with pytest.raises(SystemExit) as exit_:
            main()
        err = capsys.readouterr().err
        assert exit_.value.code in (0, 2, None), (args, exit_.value.code, err[-800:])
        assert "Traceback" not in err, (args, err[-800:])
        if exit_.value.code == 2:
            assert len([line for line in err.splitlines() if line.strip()]) == 1, (args, err)


@pytest.mark.parametrize("value", HOSTILE + ["{x}", "{{0}}", "%(name)s"])
def test_messages_carry_user_text_as_text(value):
    for exc in (OptionError("seq_len", f"{value!r} is odd"), needs_option(f"{value} exists", "; {0} replaces it", "force"),
                MissingOption("data", "needed by {0}", ("heal_steps",))):
        rendered = exc.render(lambda p: f"--{p}")
        assert rendered.count("--") >= 1
        if "exists" in rendered:
            assert rendered == f"{value} exists; --force replaces it"
        if "odd" in rendered:
            assert rendered == f"--seq_len: {value!r} is odd"
