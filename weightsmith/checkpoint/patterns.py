"""Regular expressions an untrusted folder supplies (a tokenizer's split rules, an adapter's module patterns): refused
unless they compile and have no shape that lets a backtracking engine take exponential time on a short input."""
from __future__ import annotations

import re
from collections.abc import Callable

from ..errors import WeightsmithError

MAX_PATTERN = 10_000
_COUNT = re.compile(r"\{(\d*)(,?)(\d*)\}")


def check_pattern(pattern: object, where: str, compile_with: Callable[[str], object] = re.compile) -> None:
    """Refuse ``pattern`` unless it is a string that ``compile_with`` accepts and no repeated group holds a
    repetition or an alternative (``(a+)+``, ``(a|aa)*``: the shapes of catastrophic backtracking)."""
    if not isinstance(pattern, str) or len(pattern) > MAX_PATTERN:
        raise WeightsmithError(f"{where}: a pattern must be a string of at most {MAX_PATTERN} characters")
    try:
        compile_with(pattern)
    except Exception as exc:  # noqa: BLE001 - re.error, or the Rust engine's plain Exception
        raise WeightsmithError(f"{where}: pattern {pattern!r} does not compile ({' '.join(str(exc).split())})") from None
    if _nested_repetition(pattern):
        raise WeightsmithError(f"{where}: pattern {pattern!r} repeats a group that itself repeats or has "
                               "alternatives, which can take exponential time to match; refused")


def _quantifier(pattern: str, i: int) -> tuple[bool, int]:
    """Whether a quantifier starting at ``i`` lets its atom repeat (``*``, ``+``, ``{n,}``, ``{n,m}`` with m > 1),
    and the index after it (lazy and possessive marks included)."""
    repeats, end = False, i
    if i < len(pattern) and pattern[i] in "*+?":
        repeats, end = pattern[i] != "?", i + 1
    elif i < len(pattern) and (m := _COUNT.match(pattern, i)) and (m.group(1) or m.group(3)):
        low, comma, high = m.groups()
        repeats, end = bool(comma and not high) or int(high or low or 0) > 1, m.end()
    if end > i and end < len(pattern) and pattern[end] in "?+":
        end += 1
    return repeats, end


def _skip_class(pattern: str, i: int) -> int:
    """The index after the character class opening at ``i`` (nested classes and escapes included)."""
    depth, i = 0, i
    while i < len(pattern):
        c = pattern[i]
        if c == "\\":
            i += 2
            continue
        if c == "[":
            depth += 1
            i += 2 if pattern[i + 1:i + 2] == "]" or pattern[i + 1:i + 3] == "^]" else 1
            continue
        if c == "]":
            depth -= 1
            if depth == 0:
                return i + 1
        i += 1
    return i


def _nested_repetition(pattern: str) -> bool:
    frames = [[False, False]]  # per open group: holds a repetition, holds an alternative
    i = 0
    while i < len(pattern):
        c = pattern[i]
        if c == "(":
            frames.append([False, False])
            i += 1
            continue
        if c == "|":
            frames[-1][1] = True
            i += 1
            continue
        if c == ")" and len(frames) > 1:
            inner = frames.pop()
            repeats, i = _quantifier(pattern, i + 1)
            if repeats and (inner[0] or inner[1]):
                return True
            frames[-1][0] |= repeats or inner[0]
            continue
        i = _skip_class(pattern, i) if c == "[" else i + (2 if c == "\\" else 1)
        repeats, i = _quantifier(pattern, i)
        frames[-1][0] |= repeats
    return False
