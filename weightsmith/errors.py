"""The exception types for bad input: the CLI prints the message as a single line and exits 2.

An option's bad value raises an :class:`OptionError` (one of the typed subclasses below). It carries the
option's library name (``param``) and the problem without naming how the user spelled the option; whoever
shows it words the name for its user:

    >>> err = InvalidChoice("mapping", "lsh", ("stable", "roast"))
    >>> str(err)                                                   # library: the parameter's name
    "mapping: 'lsh' is not one of stable, roast"
    >>> err.render(flag)                                           # CLI: flag("mapping") -> '--mapping'
    "--mapping: 'lsh' is not one of stable, roast"
    >>> err.render(lambda p: f"params.{p}", subject="stage 'c', key 'params.mapping'")   # pipeline
    "stage 'c', key 'params.mapping': 'lsh' is not one of stable, roast"
"""
from __future__ import annotations

import re
from collections.abc import Callable, Sequence
from typing import Any


class WeightsmithError(Exception):
    """A refusal the user can act on. The message names the file, tensor or option and the fix."""


def _plain(param: str) -> str:
    return param


class OptionError(WeightsmithError):
    """A bad option value. ``param`` is the option's library name (None: the problem names its options itself);
    ``problem`` says what is wrong, with ``{0}``, ``{1}``, ... standing for the options in ``others``."""

    def __init__(self, param: str | None, problem: str, others: Sequence[str] = ()):
        self.param, self.problem, self.others = param, problem, tuple(others)
        self.where: str | None = None
        super().__init__(self.render())

    def at(self, where: str, name: Callable[[str], str] = _plain) -> OptionError:
        """The same error located in a file (``where``, e.g. ``recipe r.yml: models[1]``): its own message becomes
        ``where: name(param): problem``; ``render`` still words it for other users."""
        self.where = where
        self.args = (f"{where}: {self.render(name)}",)
        return self

    def render(self, name: Callable[[str], str] = _plain, subject: str | None = None) -> str:
        """The message with every option named by ``name(param)``; ``subject`` replaces the leading name
        (pipeline style: ``stage 'x', key 'params.y'``)."""
        problem = _fill(self.problem, [name(o) for o in self.others]) if self.others else self.problem
        if subject is None and self.param is not None:
            subject = name(self.param)
        return f"{subject}: {problem}" if subject else problem


_SLOT = re.compile(r"\{\{|\}\}|\{(\d+)\}")


def _fill(template: str, names: list[str]) -> str:
    """``template`` with ``{N}`` replaced by ``names[N]`` and ``{{``/``}}`` by single braces; nothing else in it is
    read (a brace or ``%s`` from a user's value is text, never a format directive: no message can fail to word)."""
    def slot(m: re.Match) -> str:
        if m.group(1) is None:
            return m.group(0)[0]
        i = int(m.group(1))
        return names[i] if i < len(names) else m.group(0)
    return _SLOT.sub(slot, template)


def literal(text: object) -> str:
    """User text for a message with option slots: its braces escaped, so ``{0}`` in a value stays ``{0}``."""
    return str(text).replace("{", "{{").replace("}", "}}")


def needs_option(problem: str, fix: str, *options: str) -> OptionError:
    """A refusal whose fix is to set an option: ``problem`` is plain text, ``fix`` names the options as ``{0}``,
    ``{1}``, ... (``needs_option("out exists", "; {0} replaces it", "force")``: the CLI says ``--force``)."""
    return OptionError(None, literal(problem) + fix, options)


def reworded(exc: WeightsmithError, name: Callable[[str], str | None] = lambda p: None, subject: str | None = None,
             prefix: str = "", suffix: str = "") -> WeightsmithError:
    """``exc`` inside a longer message (``prefix``, ``suffix``: plain text), with the options ``name`` words
    worded; the options it leaves (``name`` gives None) stay an ``OptionError``'s, for the next reader to word
    (a pipeline words its stage's params, the CLI words what is left as flags)."""
    if not isinstance(exc, OptionError) or exc.where:
        return WeightsmithError(f"{prefix}{exc}{suffix}")
    left: list[str] = []

    def mark(p: str) -> str:
        worded = name(p)
        if worded is not None:
            return worded
        if p not in left:
            left.append(p)
        return f"\0{left.index(p)}\0"
    text = prefix + exc.render(mark, subject) + suffix
    if not left:
        return WeightsmithError(text)
    return OptionError(None, re.sub("\0(\\d+)\0", r"{\1}", literal(text)), left)


class InvalidChoice(OptionError):
    """``value`` is not one of ``choices``."""

    def __init__(self, param: str, value: Any, choices: Sequence[Any]):
        self.value, self.choices = value, tuple(choices)
        super().__init__(param, f"{value!r} is not one of {', '.join(map(str, self.choices))}")


class OutOfRange(OptionError):
    """``value`` lies outside ``lo`` .. ``hi`` (None: unbounded; ``*_open``: the bound itself is excluded)."""

    def __init__(self, param: str, value: Any, lo: float | None = None, hi: float | None = None, *,
                 lo_open: bool = False, hi_open: bool = False):
        self.value, self.lo, self.hi = value, lo, hi
        left = "(" if lo is None or lo_open else "["
        right = ")" if hi is None or hi_open else "]"
        span = f"{left}{'-inf' if lo is None else f'{lo:g}'}, {'inf' if hi is None else f'{hi:g}'}{right}"
        super().__init__(param, f"{value!r} is out of range; it must be in {span}")


class MissingOption(OptionError):
    """A required option is absent, or another option's value needs it (``because``, with ``{0}`` ... names)."""

    def __init__(self, param: str, because: str = "required", others: Sequence[str] = ()):
        super().__init__(param, because, others)


class UnknownOption(OptionError):
    """A name that is not an option of the stage."""

    def __init__(self, param: str, known: Sequence[str]):
        self.known = tuple(known)
        super().__init__(param, f"no such option; the options are {', '.join(self.known)}")
