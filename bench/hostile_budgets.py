"""What the input budgets save: a YAML alias bomb and a one-line data file with a small --max-tokens, each read the
budgeted way (weightsmith) and the plain way (PyYAML's safe_load then one walk of the value; the whole file
tokenised, then cut), side by side. The plain way runs in a child process with a time limit and its peak memory.

    .venv/bin/python bench/hostile_budgets.py [--levels 9] [--megabytes 3.5] [--max-tokens 100] [--limit 30]
"""
from __future__ import annotations

import argparse
import multiprocessing
import resource
import tempfile
import time
from pathlib import Path


def bomb(levels: int) -> str:
    names = [f"l{i}" for i in range(levels)]
    text = f"{names[0]}: &{names[0]} [x, x, x, x, x, x, x, x, x]\n"
    for prev, name in zip(names, names[1:]):
        text += f"{name}: &{name} [" + ", ".join([f"*{prev}"] * 9) + "]\n"
    return text


def walk(value) -> int:
    if isinstance(value, dict):
        return 1 + sum(walk(v) for v in value.values())
    if isinstance(value, list):
        return 1 + sum(walk(v) for v in value)
    return 1


def plain_yaml(text: str) -> tuple[str, float]:
    import yaml

    start = time.perf_counter()
    return f"{walk(yaml.safe_load(text)):,} values walked", time.perf_counter() - start


def budgeted_yaml(text: str) -> tuple[str, float]:
    import yaml

    from weightsmith.checkpoint.textfile import load_yaml

    start = time.perf_counter()
    try:
        load_yaml(text)
    except yaml.YAMLError as exc:
        return f"refused: {exc}", time.perf_counter() - start
    return "read", time.perf_counter() - start


def tokens(path: str, max_tokens: int, tokenizer: str, budgeted: bool) -> tuple[str, float]:
    """The first ``max_tokens`` tokens of ``path``: its texts read with the budget, or whole and cut after."""
    from weightsmith.eval import load_texts, load_tokenizer, tokenize

    tok = load_tokenizer(tokenizer)
    start = time.perf_counter()
    ids = tokenize(tok, load_texts(path, max_tokens=max_tokens if budgeted else None))[:max_tokens]
    return f"{len(ids)} tokens", time.perf_counter() - start


def _child(fn, args, queue) -> None:
    result, seconds = fn(*args)
    queue.put((result, seconds, resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024))


def measured(fn, args, limit: float) -> str:
    """``fn(*args)`` in a fresh process: its answer, seconds (imports excluded) and peak MB, or how long it ran
    before being stopped."""
    queue = multiprocessing.get_context("spawn").Queue()
    proc = multiprocessing.get_context("spawn").Process(target=_child, args=(fn, args, queue))
    proc.start()
    proc.join(limit)
    if proc.is_alive():
        proc.kill()
        proc.join()
        return f"not done after {limit:.0f} s (stopped)"
    result, seconds, peak = queue.get()
    return f"{seconds:.3f} s, peak {peak:,.0f} MB ({result})"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--levels", type=int, default=9, help="alias levels of nine (9 levels: 9^9 values)")
    parser.add_argument("--megabytes", type=float, default=3.5, help="size of the one-line data file")
    parser.add_argument("--max-tokens", type=int, default=100)
    parser.add_argument("--limit", type=float, default=30.0, help="seconds the plain way may run")
    args = parser.parse_args()
    from weightsmith.zoo import build

    text = bomb(args.levels)
    print(f"YAML alias bomb, {len(text)} bytes, {args.levels} levels")
    print(f"  safe_load + walk : {measured(plain_yaml, (text,), args.limit)}")
    print(f"  load_yaml        : {measured(budgeted_yaml, (text,), args.limit)}")
    tokenizer = str(build("tiny").model("base"))
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "one-line.txt"
        path.write_text("word " * int(args.megabytes * 1e6 / 5))
        print(f"--data: {args.megabytes} MB on one line, max_tokens {args.max_tokens}")
        for label, budgeted in (("whole file", False), ("budgeted", True)):
            print(f"  {label:<17}: {measured(tokens, (str(path), args.max_tokens, tokenizer, budgeted), args.limit)}")


if __name__ == "__main__":
    main()
