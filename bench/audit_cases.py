"""The trust audit's cases, re-run one by one: each case the trust issue names (classes 1-11) is rebuilt from its
description on a temporary copy of the zoo's `base` model or of all-MiniLM-L6-v2, run as a weightsmith subprocess
(or, for class 9, the stock loader it concerns), and judged: good when it ends with one line and a non-zero exit
(one `error:` line; for a stock loader, its own error naming `weightsmith export --plain`) or with a correct result,
in both cases with every input byte-identical and no temporary folder or lock left.

    .venv/bin/python bench/audit_cases.py [--only CLASS|TEXT] [--markdown]
"""
from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))  # the tests' loopback servers and folders

import torch  # noqa: E402
import transformers  # noqa: E402
from safetensors.torch import load_file, save_file  # noqa: E402

from cli_check import precious  # noqa: E402
from fake_hub import TOKEN, AnswerServer, DripServer, FakeHub  # noqa: E402

transformers.utils.logging.disable_progress_bar()  # the checks load models in this process: one table, no bars
CASES: list["Case"] = []
PY = sys.executable


@dataclass
class Spec:
    """One run: the command, the inputs that must stay byte-identical, what a good end looks like."""
    argv: list[str]
    inputs: list[Path]
    expect: str = "refuse"  # refuse | ok | signal | stock
    check: Callable[["Result"], tuple[bool, str]] | None = None  # for "ok": is the result correct?
    during: Callable[[subprocess.Popen], None] | None = None  # e.g. send a signal
    env: dict = field(default_factory=dict)
    timeout: float = 300
    out: Path | None = None  # the output folder: no temp folder or lock may be left beside it


@dataclass
class Result:
    rc: int | str
    stderr: str
    stdout: str
    seconds: float


@dataclass
class Case:
    cls: str
    name: str
    build: Callable[["Work"], Spec]


def case(cls: str, name: str):
    def register(build):
        CASES.append(Case(cls, name, build))
        return build
    return register


class Work:
    """The audit's folder: copies of the zoo base and MiniLM, their data, and one folder per case."""

    def __init__(self, root: Path):
        from weightsmith.zoo import build, minilm_path

        zoo = build("tiny")
        self.root = root
        self.base = Path(shutil.copytree(zoo.model("base"), root / "base"))
        self.minilm = Path(shutil.copytree(minilm_path(), root / "minilm"))
        self.calib = Path(shutil.copy(zoo.data("general", "calib"), root / "calib.txt"))
        self.valid = Path(shutil.copy(zoo.data("general", "valid"), root / "valid.txt"))
        self.sentences = root / "sentences.txt"
        self.sentences.write_text("\n".join(self.valid.read_text().splitlines()[:40]) + "\n")
        self.n = 0
        self.mounts: list[Path] = []

    def dir(self) -> Path:
        self.n += 1
        path = self.root / f"case{self.n:02d}"
        path.mkdir()
        return path

    def variant(self, src: Path, into: Path, edit=None, drop: str | None = None, config: dict | None = None) -> Path:
        """A copy of ``src`` with a tensor dropped, its config edited, or ``edit(folder)`` applied."""
        out = Path(shutil.copytree(src, into))
        if drop:
            tensors = load_file(str(out / "model.safetensors"))
            tensors.pop(drop)
            save_file(tensors, str(out / "model.safetensors"), metadata={"format": "pt"})
        if config:
            cfg = json.loads((out / "config.json").read_text())
            cfg.update(config)
            (out / "config.json").write_text(json.dumps(cfg))
        if edit:
            edit(out)
        return out


def ws(*args) -> list[str]:
    return [PY, "-m", "weightsmith", *map(str, args)]


def snapshot(path: Path) -> dict[str, str]:
    path = Path(path)
    if path.is_file():
        return {"": hashlib.sha256(path.read_bytes()).hexdigest()}
    return {str(p.relative_to(path)): hashlib.sha256(p.read_bytes()).hexdigest() if p.is_file() and not p.is_symlink()
            else "link" if p.is_symlink() else "dir" for p in sorted(path.rglob("*"))}


def leftovers(out: Path | None) -> list[str]:
    if out is None or not out.parent.exists():
        return []
    return [p.name for p in out.parent.iterdir() if p.name.startswith((f"{out.name}.tmp-", f"{out.name}.old-",
                                                                      f".{out.name}.weightsmith-lock"))]


def execute(spec: Spec, cwd: Path) -> Result:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "NO_PROXY": "127.0.0.1", **spec.env}
    env = {k: v for k, v in env.items() if v is not None}
    start = time.time()
    proc = subprocess.Popen(spec.argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env, cwd=cwd,
                            start_new_session=True)
    if spec.during:
        spec.during(proc)
    try:
        out, err = proc.communicate(timeout=spec.timeout)
        rc: int | str = proc.returncode
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        out, err = proc.communicate()
        rc = f"killed after {spec.timeout:.0f} s"
    return Result(rc, err, out, time.time() - start)


def judge(spec: Spec, res: Result, unchanged: bool, left: list[str]) -> tuple[bool, str]:
    lines = [ln for ln in res.stderr.splitlines() if ln.strip()]
    one_line = len(lines) == 1 and lines[0].startswith("error:") and "Traceback" not in res.stderr
    if spec.expect == "stock":
        good = res.rc not in (0,) and isinstance(res.rc, int) and "weightsmith export --plain" in res.stderr
        why = "stock loader refuses, naming export --plain" if good else "stock loader does not refuse by name"
    elif spec.expect == "signal":
        good = res.rc in (130, 143) and one_line
        why = f"exit {res.rc}, one line" if good else "not one line with 130/143"
    elif isinstance(res.rc, int) and res.rc != 0:
        good, why = one_line, "one line, non-zero exit" if one_line else "non-zero exit but not one error line"
    elif res.rc == 0 and spec.check is not None:
        good, why = spec.check(res)
    else:
        good, why = False, f"exit {res.rc}" + (" (a refusal was expected)" if spec.expect == "refuse" else "")
    if not unchanged:
        good, why = False, why + "; an input changed"
    if left:
        good, why = False, why + f"; left {left[0]}"
    return good, why


def first_line(spec: Spec, res: Result) -> str:
    """stderr's first line; for a stock loader (whose warnings come first) or a traceback, the error raised."""
    lines = [ln for ln in res.stderr.splitlines() if ln.strip()]
    if not lines:
        return "(none)"
    return lines[-1] if spec.expect == "stock" or lines[0].startswith("Traceback") else lines[0]


def run_case(c: Case, work: Work) -> dict:
    try:
        spec = c.build(work)
    except Exception as exc:  # noqa: BLE001 - a case that cannot be set up here is reported, not judged
        return {"cls": c.cls, "case": c.name, "rc": "-", "line": f"not run: {exc}", "unchanged": "-",
                "verdict": "skipped", "seconds": 0.0}
    before = [snapshot(p) for p in spec.inputs]
    res = execute(spec, work.root)
    unchanged = [snapshot(p) for p in spec.inputs] == before
    left = leftovers(spec.out)
    good, why = judge(spec, res, unchanged, left)
    line = first_line(spec, res).replace(f"{work.root}/", "")  # paths shown relative to the audit's folder
    line = line if len(line) <= 140 else line[:137] + "..."
    return {"cls": c.cls, "case": c.name, "rc": res.rc, "line": line, "unchanged": "yes" if unchanged
            else "NO", "verdict": ("good: " if good else "BAD: ") + why, "seconds": res.seconds}


# -- class 1: a model is exactly its tensors ------------------------------------------------------------------------
HOLE = "model.layers.3.mlp.down_proj.weight"


@case("1", f"eval: folder missing {HOLE}")
def _(w: Work) -> Spec:
    holed = w.variant(w.base, w.dir() / "holed", drop=HOLE)
    return Spec(ws("eval", holed, "--data", w.valid, "--max-tokens", 2000, "-q"), [holed])


@case("1", "eval: folder whose only weights are an unrelated adapter tensor")
def _(w: Work) -> Spec:
    d = w.dir() / "adapter-only"
    d.mkdir()
    shutil.copy(w.base / "config.json", d / "config.json")
    save_file({"base_model.model.q_proj.lora_A.weight": torch.zeros(8, 64)}, str(d / "model.safetensors"))
    return Spec(ws("eval", d, "--data", w.valid, "--max-tokens", 2000, "-q"), [d])


def _unrelated_adapter(w: Work, d: Path) -> Path:
    """A peft LoRA adapter folder for the zoo base whose tensors name modules the base does not have."""
    ad = d / "adapter"
    ad.mkdir()
    (ad / "adapter_config.json").write_text(json.dumps(
        {"peft_type": "LORA", "r": 4, "lora_alpha": 8, "target_modules": ["fc_in"], "task_type": "CAUSAL_LM",
         "base_model_name_or_path": str(w.base)}))
    prefix = "base_model.model.transformer.h.0.mlp.fc_in"
    save_file({f"{prefix}.lora_A.weight": torch.randn(4, 64), f"{prefix}.lora_B.weight": torch.randn(64, 4)},
              str(ad / "adapter_model.safetensors"))
    return ad


@case("1", "eval: a folder holding only an unrelated LoRA adapter")
def _(w: Work) -> Spec:
    ad = _unrelated_adapter(w, w.dir())
    return Spec(ws("eval", ad, "--data", w.valid, "--max-tokens", 2000, "-q"), [ad, w.base])


@case("1", "eval: base+adapter with an unrelated LoRA adapter")
def _(w: Work) -> Spec:
    ad = _unrelated_adapter(w, w.dir())
    return Spec(ws("eval", f"{w.base}+{ad}", "--data", w.valid, "--max-tokens", 2000, "-q"), [ad, w.base])


@case("1", "fold: input missing a tensor")
def _(w: Work) -> Spec:
    d = w.dir()
    holed = w.variant(w.base, d / "holed", drop=HOLE)
    return Spec(ws("fold", holed, "-o", d / "out", "--data", w.calib, "--max-tokens", 2000, "-q"), [holed, w.calib],
                out=d / "out")


@case("1", "compress rps: input missing a tensor")
def _(w: Work) -> Spec:
    d = w.dir()
    holed = w.variant(w.base, d / "holed", drop=HOLE)
    return Spec(ws("compress", "rps", holed, "-o", d / "out", "--budget", 0.5, "-q"), [holed], out=d / "out")


@case("1", "run: a fold stage on an input missing a tensor")
def _(w: Work) -> Spec:
    d = w.dir()
    holed = w.variant(w.base, d / "holed", drop=HOLE)
    pipe = d / "pipe.yaml"
    pipe.write_text(f"name: p\nstages:\n  - name: folded\n    stage: fold\n    inputs: [{holed}]\n"
                    f"    params: {{data: {w.calib}, max_tokens: 2000}}\n")
    return Spec(ws("run", pipe, "--workdir", d / "work", "-q"), [holed, pipe], out=d / "work" / "folded")


@case("1", "eval: num_hidden_layers 1000000 over 4 layers of tensors")
def _(w: Work) -> Spec:
    deep = w.variant(w.base, w.dir() / "deep", config={"num_hidden_layers": 1_000_000})
    return Spec(ws("eval", deep, "--data", w.valid, "--max-tokens", 2000, "-q"), [deep], timeout=120)


# -- class 2: delete and overwrite only what weightsmith wrote -------------------------------------------------------
def _written_out(w: Work, d: Path) -> Path:
    out = d / "out"
    proc = subprocess.run(ws("merge", "--method", "linear", "--model", w.base, "--model", w.base, "-o", out, "-q"),
                          capture_output=True, text=True)
    if proc.returncode:
        raise RuntimeError(proc.stderr.strip().splitlines()[-1])
    return out


def _merge_to(w: Work, out: Path, *extra) -> list[str]:
    return ws("merge", "--method", "linear", "--model", w.base, "--model", w.base, "-o", out, "-q", *extra)


@case("2", "a planted .OUT.weightsmith-replace journal naming a user folder, then merge --force")
def _(w: Work) -> Spec:
    d = w.dir()
    out, mine = _written_out(w, d), precious(d / "mine")
    (d / ".out.weightsmith-replace").write_text(json.dumps({"new": "out.tmp-1-0000000a", "old": "mine"}))

    def check(res: Result) -> tuple[bool, str]:
        return (mine / "notes.txt").is_file() and (out / "model.safetensors").is_file(), "merged; journal ignored"
    return Spec(_merge_to(w, out, "--force"), [mine, w.base], expect="ok", check=check, out=out)


@case("2", "the lock file planted as a symlink to a user's file")
def _(w: Work) -> Spec:
    d = w.dir()
    mine = precious(d / "mine")
    (d / ".out.weightsmith-lock").mkdir(mode=0o700)
    (d / ".out.weightsmith-lock" / "lock").symlink_to(mine / "notes.txt")
    return Spec(_merge_to(w, d / "out"), [mine, w.base])


def _data_stage(w: Work, *extra) -> Spec:
    d = w.dir()
    (d / "work" / "data").mkdir(parents=True)
    data = Path(shutil.copy(w.calib, d / "work" / "data" / "calib.txt"))
    pipe = d / "pipe.yaml"
    pipe.write_text(f"name: p\nstages:\n  - name: data\n    stage: fold\n    inputs: [{w.base}]\n"
                    f"    params: {{data: {data}, max_tokens: 2000}}\n")
    return Spec(ws("run", pipe, "--workdir", d / "work", "-q", *extra), [d / "work" / "data", w.base])


case("2", "run: a stage named `data` over the user's data/ holding its own input")(_data_stage)
case("11", "run --dry-run: the same stage named `data`")(lambda w: _data_stage(w, "--dry-run"))


@case("2", "merge --force onto a git project weightsmith never wrote")
def _(w: Work) -> Spec:
    mine = precious(w.dir() / "project")
    return Spec(_merge_to(w, mine, "--force"), [mine, w.base])


@case("2", "two merge --force runs to one OUT with different TMPDIRs")
def _(w: Work) -> Spec:
    d = w.dir()
    out = _written_out(w, d)
    (d / "t1").mkdir()
    (d / "t2").mkdir()
    holder = subprocess.Popen(_merge_to(w, out, "--force"), env={**os.environ, "TMPDIR": str(d / "t1")},
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    _signal_when(_locked(out), signal.SIGSTOP)(holder)  # the first run holds OUT's lock while the second starts

    def resume(proc: subprocess.Popen) -> None:
        proc.wait()
        os.kill(holder.pid, signal.SIGCONT)
        holder.wait()
    return Spec(_merge_to(w, out, "--force"), [w.base], env={"TMPDIR": str(d / "t2")}, during=resume)


# -- class 3: exit codes and signals -------------------------------------------------------------------------------
def _signal_when(ready: Callable[[int], bool], sig: int, after: float = 0.0):
    """Send ``sig`` ``after`` seconds past the moment ``ready(pid)`` holds."""
    def send(proc: subprocess.Popen) -> None:
        deadline = time.time() + 120
        while proc.poll() is None and not ready(proc.pid) and time.time() < deadline:
            time.sleep(0.01)
        time.sleep(after)
        if proc.poll() is None:
            os.kill(proc.pid, sig)
    return send


def _locked(out: Path) -> Callable[[int], bool]:
    """The run holds ``out``'s lock (it has checked its inputs and output and starts computing)."""
    return lambda pid: (out.parent / f".{out.name}.weightsmith-lock").exists()


def _mapped(weights: Path) -> Callable[[int], bool]:
    """The run has mapped ``weights`` (its model is loaded)."""
    def ready(pid: int) -> bool:
        try:
            return str(weights) in Path(f"/proc/{pid}/maps").read_text()
        except OSError:
            return False
    return ready


@case("3", "Ctrl-C (SIGINT) during merge")
def _(w: Work) -> Spec:
    d = w.dir()
    argv = ws("merge", "--method", "linear", "--model", w.minilm, "--model", w.minilm, "-o", d / "out", "-q")
    return Spec(argv, [w.minilm], expect="signal", during=_signal_when(_locked(d / "out"), signal.SIGINT),
                out=d / "out")


@case("3", "Ctrl-C (SIGINT) during fold")
def _(w: Work) -> Spec:
    d = w.dir()
    argv = ws("fold", w.base, "-o", d / "out", "--data", w.calib, "--max-tokens", 4000, "-q")
    return Spec(argv, [w.base], expect="signal", during=_signal_when(_locked(d / "out"), signal.SIGINT, 1.0),
                out=d / "out")


@case("3", "Ctrl-C (SIGINT) during eval")
def _(w: Work) -> Spec:
    data = w.dir() / "long.txt"
    data.write_text(w.valid.read_text() * 40)
    return Spec(ws("eval", w.base, "--data", data, "-q"), [w.base, data], expect="signal",
                during=_signal_when(_mapped(w.base.resolve() / "model.safetensors"), signal.SIGINT, 1.0))


@case("3", "SIGTERM during compress rps")
def _(w: Work) -> Spec:
    d = w.dir()
    argv = ws("compress", "rps", w.minilm, "-o", d / "out", "--budget", 0.5, "-q")
    return Spec(argv, [w.minilm], expect="signal", during=_signal_when(_locked(d / "out"), signal.SIGTERM),
                out=d / "out")


# -- class 4: no stage publishes a non-finite model -----------------------------------------------------------------
@case("4", "fold with a diverging heal (--heal-lr 1e12)")
def _(w: Work) -> Spec:
    d = w.dir()
    return Spec(ws("fold", w.base, "-o", d / "out", "--data", w.calib, "--max-tokens", 2000, "--heal-steps", 3,
                   "--heal-lr", "1e12", "-q"), [w.base], out=d / "out")


@case("4", "compress rps with a diverging heal (--lr 1e12)")
def _(w: Work) -> Spec:
    d = w.dir()
    return Spec(ws("compress", "rps", w.base, "-o", d / "out", "--budget", 0.5, "--data", w.calib, "--heal-steps", 3,
                   "--lr", "1e12", "-q"), [w.base], out=d / "out")


# -- class 5: hostile input costs bounded time and memory -----------------------------------------------------------
def _bomb(levels: int = 9) -> str:
    names = [f"l{i}" for i in range(levels)]
    text = f"{names[0]}: &{names[0]} [x, x, x, x, x, x, x, x, x]\n"
    for prev, name in zip(names, names[1:]):
        text += f"{name}: &{name} [" + ", ".join([f"*{prev}"] * 9) + "]\n"
    return text


@case("5", "run --dry-run: YAML alias bomb in a merge stage's parameters")
def _(w: Work) -> Spec:
    d = w.dir()
    pipe = d / "bomb.yaml"
    body = "".join(f"        {line}\n" for line in _bomb().splitlines())
    pipe.write_text(f"name: p\nstages:\n  - name: m\n    stage: merge\n    inputs: [{w.base}, {w.base}]\n"
                    f"    params:\n      method: linear\n      parameters:\n        weight: 0.5\n{body}")
    return Spec(ws("run", pipe, "--workdir", d / "work", "--dry-run"), [pipe, w.base], timeout=60)


@case("5", "merge: a 10 MB recipe")
def _(w: Work) -> Spec:
    d = w.dir()
    recipe = d / "big.yaml"
    recipe.write_text(f"merge_method: linear\nmodels:\n  - model: {w.base}\n  - model: {w.base}\n"
                      + "".join(f"# {'x' * 98}\n" for _ in range(100_000)))
    return Spec(ws("merge", recipe, "-o", d / "out", "-q"), [recipe], timeout=60, out=d / "out")


@case("5", "eval --max-tokens 100 on a 33 MB one-line file")
def _(w: Work) -> Spec:
    huge = w.dir() / "huge.txt"
    huge.write_text(("the cat sat on the mat and then it slept " * 800_000)[:33_000_000])

    def check(res: Result) -> tuple[bool, str]:
        return res.seconds < 60, f"scored in {res.seconds:.1f} s"
    return Spec(ws("eval", w.base, "--data", huge, "--max-tokens", 100, "-q"), [huge, w.base], expect="ok",
                check=check, timeout=120)


@case("5", "push --timeout 5 to a server dripping a byte every 2 s")
def _(w: Work) -> Spec:
    server = DripServer(interval=2.0, lifetime=120).__enter__()

    def stop(proc: subprocess.Popen) -> None:
        proc.wait()
        server.close()
    return Spec(ws("push", w.base, "alice/x", "--timeout", 5, "-q"), [w.base], during=stop, timeout=110,
                env=_hub_env(w, server.url))


def _hub_env(w: Work, url: str) -> dict:
    return {"HF_ENDPOINT": url, "HF_TOKEN": TOKEN, "HF_HOME": str(w.root / "hf-home"), "HF_HUB_DISABLE_XET": "1",
            "HF_HUB_OFFLINE": None, "WEIGHTSMITH_OFFLINE_BY_DEFAULT": None}


# -- class 6: nothing is read outside the gate ----------------------------------------------------------------------
SECRET = "private-notes-4b1d"


@case("6", "merge: an input README.md symlinked out of the folder")
def _(w: Work) -> Spec:
    d = w.dir()
    (d / "secret.md").write_text(f"---\nbase_model: org/{SECRET}\n---\n{SECRET}\n")
    model = w.variant(w.base, d / "model", edit=lambda m: (m / "README.md").symlink_to(d / "secret.md"))

    def check(res: Result) -> tuple[bool, str]:
        card = (d / "out" / "README.md").read_text()
        return SECRET not in card, "merged; the linked README was not read"
    return Spec(ws("merge", "--method", "linear", "--model", model, "--model", w.base, "-o", d / "out", "-q"),
                [model, d / "secret.md"], expect="ok", check=check, out=d / "out")


@case("6", "push: a folder whose config _name_or_path points at a README elsewhere")
def _(w: Work) -> Spec:
    d = w.dir()
    (d / "victim").mkdir()
    (d / "victim" / "README.md").write_text(f"---\nbase_model: org/{SECRET}\n---\n{SECRET}\n")
    model = w.variant(w.base, d / "model", config={"_name_or_path": str(d / "victim")})
    hub = FakeHub(lifetime=120).__enter__()

    def stop(proc: subprocess.Popen) -> None:
        proc.wait()
        hub.close()

    def check(res: Result) -> tuple[bool, str]:
        card = hub.repos["alice/x"]["branches"]["main"]["README.md"].decode()
        return SECRET not in card, "pushed; the card does not hold the other README"
    return Spec(ws("push", model, "alice/x", "-q"), [model, d / "victim"], expect="ok", check=check, during=stop,
                env=_hub_env(w, hub.url))


# -- class 7: finished work is never discarded for a side file ------------------------------------------------------
def _bad_readme(kind: str):
    text = {"yaml": b"---\nNotes: a rule: not front matter [draft\n---\nText.\n", "utf8": b"---\nlicense: mit\n---\n\xff\xfe"}
    return lambda m: (m / "README.md").write_bytes(text[kind])


def _finished(out: Path):
    def check(res: Result) -> tuple[bool, str]:
        noted = "not used" in (out / "README.md").read_text()
        return (out / "model.safetensors").is_file(), "finished" + ("; the card says the input card was not used"
                                                                    if noted else "")
    return check


@case("7", "merge: input README whose front matter is not YAML (a `---` rule)")
def _(w: Work) -> Spec:
    d = w.dir()
    model = w.variant(w.base, d / "model", edit=_bad_readme("yaml"))
    return Spec(ws("merge", "--method", "linear", "--model", model, "--model", w.base, "-o", d / "out", "-q"),
                [model], expect="ok", check=_finished(d / "out"), out=d / "out")


@case("7", "fold: input README that is not UTF-8")
def _(w: Work) -> Spec:
    d = w.dir()
    model = w.variant(w.base, d / "model", edit=_bad_readme("utf8"))
    return Spec(ws("fold", model, "-o", d / "out", "--data", w.calib, "--max-tokens", 2000, "-q"), [model],
                expect="ok", check=_finished(d / "out"), out=d / "out")


@case("7", "compress rps: input README whose front matter is not YAML")
def _(w: Work) -> Spec:
    d = w.dir()
    model = w.variant(w.base, d / "model", edit=_bad_readme("yaml"))
    return Spec(ws("compress", "rps", model, "-o", d / "out", "--budget", 0.5, "-q"), [model], expect="ok",
                check=_finished(d / "out"), out=d / "out")


# -- class 8: one line, never a traceback ---------------------------------------------------------------------------
def _renamed(w: Work, name: str) -> Path:
    def edit(m: Path) -> None:
        tensors = load_file(str(m / "model.safetensors"))
        tensors[name] = tensors.pop("model.norm.weight")
        save_file(tensors, str(m / "model.safetensors"), metadata={"format": "pt"})
    return w.variant(w.base, w.dir() / "model", edit=edit)


@case("8", "inspect: tensor name holding rich markup `[/]`")
def _(w: Work) -> Spec:
    model = _renamed(w, "model.[/]evil[bold].weight")

    def check(res: Result) -> tuple[bool, str]:
        return "[/]evil[bold]" in res.stdout, "listed, the name printed as it is"
    return Spec(ws("inspect", model, "--tensors"), [model], expect="ok", check=check)


@case("8", "inspect: tensor name holding a terminal escape")
def _(w: Work) -> Spec:
    model = _renamed(w, "model.\x1b[2Jnorm.weight")

    def check(res: Result) -> tuple[bool, str]:
        return "\x1b" not in res.stdout and "\\x1b" in res.stdout, "listed, the escape written as \\x1b"
    return Spec(ws("inspect", model, "--tensors"), [model], expect="ok", check=check)


def _tokenizer_edit(edit):
    def apply(m: Path) -> None:
        tok = json.loads((m / "tokenizer.json").read_text())
        edit(tok)
        (m / "tokenizer.json").write_text(json.dumps(tok))
    return apply


@case("8", "eval: tokenizer.json with a catastrophic split regex")
def _(w: Work) -> Spec:
    evil = {"type": "Split", "pattern": {"Regex": "(a+)+$"}, "behavior": "Isolated", "invert": False}
    model = w.variant(w.base, w.dir() / "model", edit=_tokenizer_edit(lambda t: t.update(pre_tokenizer=evil)))
    return Spec(ws("eval", model, "--data", w.valid, "--max-tokens", 2000, "-q"), [model], timeout=120)


@case("8", "eval: tokenizer.json nested 120 levels deep")
def _(w: Work) -> Spec:
    deep: dict = {}
    for _i in range(120):
        deep = {"type": "Sequence", "pretokenizers": [deep]}
    model = w.variant(w.base, w.dir() / "model", edit=_tokenizer_edit(lambda t: t.update(pre_tokenizer=deep)))
    return Spec(ws("eval", model, "--data", w.valid, "--max-tokens", 2000, "-q"), [model], timeout=120)


@case("8", "merge: model+adapter whose adapter_config.json has r = \"eight\"")
def _(w: Work) -> Spec:
    d = w.dir()
    (d / "adapter").mkdir()
    (d / "adapter" / "adapter_config.json").write_text(json.dumps(
        {"peft_type": "LORA", "r": "eight", "lora_alpha": 16, "target_modules": ["q_proj"]}))
    save_file({"base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight": torch.zeros(8, 64)},
              str(d / "adapter" / "adapter_model.safetensors"))
    return Spec(ws("merge", "--method", "linear", "--model", f"{w.base}+{d / 'adapter'}", "--model", w.base,
                   "-o", d / "out", "-q"), [d / "adapter", w.base], out=d / "out")


@case("8", "eval: config.json with architectures: 3")
def _(w: Work) -> Spec:
    model = w.variant(w.base, w.dir() / "model", config={"architectures": 3})
    return Spec(ws("eval", model, "--data", w.valid, "--max-tokens", 2000, "-q"), [model])


@case("8", "eval: architectures naming a transformers function (pipeline)")
def _(w: Work) -> Spec:
    model = w.variant(w.base, w.dir() / "model", config={"architectures": ["pipeline"]})
    return Spec(ws("eval", model, "--data", w.valid, "--max-tokens", 2000, "-q"), [model])


@case("8", "fold --heal-lr nan")
def _(w: Work) -> Spec:
    d = w.dir()
    return Spec(ws("fold", w.base, "-o", d / "out", "--data", w.calib, "--heal-steps", 2, "--heal-lr", "nan", "-q"),
                [w.base], out=d / "out")


@case("8", "merge --seed 2^64 + 1")
def _(w: Work) -> Spec:
    d = w.dir()
    return Spec(_merge_to(w, d / "out", "--seed", 2 ** 64 + 1), [w.base], out=d / "out")


@case("8", "eval --data: a jsonl line that is not UTF-8")
def _(w: Work) -> Spec:
    data = w.dir() / "d.jsonl"
    data.write_bytes(b'{"text": "fine"}\n{"text": "\xff\xfe bad"}\n')
    return Spec(ws("eval", w.base, "--data", data, "-q"), [data, w.base])


@case("8", "eval --data: a jsonl record nested 50,000 deep")
def _(w: Work) -> Spec:
    data = w.dir() / "d.jsonl"
    data.write_text('{"text": ' + "[" * 50_000 + "]" * 50_000 + "}\n")
    return Spec(ws("eval", w.base, "--data", data, "-q"), [data, w.base])


@case("8", "eval --labelled: a CSV field past the csv module's limit")
def _(w: Work) -> Spec:
    data = w.dir() / "d.csv"
    data.write_text("label,text\n" + "a," + "x" * 200_000 + "\n")
    return Spec(ws("eval", w.base, "--labelled", data, "-q"), [data, w.base])


@case("8", "push to an endpoint answering an HTML page")
def _(w: Work) -> Spec:
    server = AnswerServer(200, b"<html><body>login</body></html>", {"Content-Type": "text/html"}, 120).__enter__()
    return Spec(ws("push", w.base, "alice/x", "--timeout", 5, "-q"), [w.base], env=_hub_env(w, server.url),
                during=lambda p: (p.wait(), server.close()), timeout=110)


@case("8", "push to an endpoint redirecting in a loop")
def _(w: Work) -> Spec:
    server = AnswerServer(302, b"", {"Location": "{url}/loop"}, 120).__enter__()
    return Spec(ws("push", w.base, "alice/x", "--timeout", 5, "-q"), [w.base], env=_hub_env(w, server.url),
                during=lambda p: (p.wait(), server.close()), timeout=110)


@case("8", "merge -o a mount point")
def _(w: Work) -> Spec:
    mnt = w.dir() / "mnt"
    mnt.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=64m", "tmpfs", str(mnt)], capture_output=True).returncode:
        raise RuntimeError("cannot mount a tmpfs here")
    w.mounts.append(mnt)
    return Spec(_merge_to(w, mnt, "--force"), [w.base])


@case("8", "merge: an input holding a float8 tensor")
def _(w: Work) -> Spec:
    def edit(m: Path) -> None:
        tensors = load_file(str(m / "model.safetensors"))
        tensors["model.norm.weight"] = tensors["model.norm.weight"].to(torch.float8_e4m3fn)
        save_file(tensors, str(m / "model.safetensors"), metadata={"format": "pt"})
    d = w.dir()
    model = w.variant(w.base, d / "fp8", edit=edit)
    return Spec(ws("merge", "--method", "linear", "--model", model, "--model", model, "-o", d / "out", "-q"), [model],
                out=d / "out")


# -- class 9: what weightsmith writes loads right in the stock tool, or fails loudly there --------------------------
def _made(w: Work, name: str, argv: list[str]) -> Path:
    out = w.root / "made" / name
    if not out.exists():
        proc = subprocess.run(argv + ["-o", str(out), "-q"], capture_output=True, text=True)
        if proc.returncode:
            raise RuntimeError(proc.stderr.strip().splitlines()[-1])
    return out


def _stock(load: str, folder: Path) -> list[str]:
    code = (f"import sys\n{load.split(';')[0]}\ntry:\n    {load.split(';')[1].strip()}(sys.argv[1])\n"
            "except Exception as exc:\n    print(f'{type(exc).__name__}: {exc}'.splitlines()[0], file=sys.stderr)\n"
            "    sys.exit(1)\n")
    return [PY, "-c", code, str(folder)]


def _folded_minilm(w: Work) -> Path:
    return _made(w, "minilm-share2", ws("fold", w.minilm, "--data", w.calib, "--remove", 0, "--share", 2,
                                        "--share-init", "first", "--max-tokens", 2000))


def _folded_base(w: Work) -> Path:
    return _made(w, "base-share2", ws("fold", w.base, "--data", w.calib, "--remove", 0, "--share", 2,
                                      "--share-init", "first", "--max-tokens", 2000))


def _rps_base(w: Work) -> Path:
    return _made(w, "base-rps", ws("compress", "rps", w.base, "--budget", 0.5))


def _stock_case(load: str, made: Callable[[Work], Path]) -> Callable[[Work], Spec]:
    def build(w: Work) -> Spec:
        folder = made(w)
        return Spec(_stock(load, folder), [folder], expect="stock")
    return build


AUTO_LM = "from transformers import AutoModelForCausalLM; AutoModelForCausalLM.from_pretrained"
for _name, _load, _made_by in [
        ("SentenceTransformer(folder) on a --share 2 fold of MiniLM",
         "from sentence_transformers import SentenceTransformer; SentenceTransformer", _folded_minilm),
        ("AutoModelForCausalLM.from_pretrained on a folded zoo model", AUTO_LM, _folded_base),
        ("LlamaForCausalLM.from_pretrained (the class named directly) on a folded zoo model",
         "from transformers import LlamaForCausalLM; LlamaForCausalLM.from_pretrained", _folded_base),
        ("AutoModelForCausalLM.from_pretrained on an RPS folder", AUTO_LM, _rps_base)]:
    case("9", _name)(_stock_case(_load, _made_by))


@case("9", "push a folded folder (no --weightsmith-format)")
def _(w: Work) -> Spec:
    folder = _folded_base(w)
    return Spec(ws("push", folder, "alice/x", "-q"), [folder], env=_hub_env(w, "http://127.0.0.1:9"))


# -- class 10: every stage runs on every architecture the README lists, or refuses it by name ------------------------
def _printed(*words: str):
    def check(res: Result) -> tuple[bool, str]:
        return all(word in res.stdout for word in words), "scored: " + ", ".join(words)
    return check


@case("10", "eval --data on all-MiniLM-L6-v2 (an encoder)")
def _(w: Work) -> Spec:
    return Spec(ws("eval", w.minilm, "--data", w.sentences, "--json", "-q"), [w.minilm, w.sentences], expect="ok",
                check=lambda r: (r.stdout.strip().startswith(("[", "{")), "scored"))


@case("10", "eval --labelled on all-MiniLM-L6-v2")
def _(w: Work) -> Spec:
    data = w.dir() / "l.jsonl"
    data.write_text("".join(json.dumps({"text": t, "label": "ab"[i % 2]}) + "\n"
                            for i, t in enumerate(w.sentences.read_text().splitlines())))
    return Spec(ws("eval", w.minilm, "--labelled", data, "--json", "-q"), [w.minilm, data], expect="ok",
                check=lambda r: (r.stdout.strip().startswith(("[", "{")), "scored"))


@case("10", "compress rps --heal-steps 2 on an encoder")
def _(w: Work) -> Spec:
    d = w.dir()
    return Spec(ws("compress", "rps", w.minilm, "-o", d / "out", "--budget", 0.5, "--data", w.calib, "--heal-steps",
                   2, "-q"), [w.minilm], out=d / "out", timeout=120)


@case("10", "export --plain of an RPS MiniLM: SentenceTransformer encodes as weightsmith.load")
def _(w: Work) -> Spec:
    folder = _made(w, "minilm-rps", ws("compress", "rps", w.minilm, "--budget", 0.5, "--modules", r"layer\.0\."))
    out = w.dir() / "plain"
    return _encodes_after_export(w, folder, out)


@case("10", "export --plain of a folded MiniLM: SentenceTransformer encodes as weightsmith.load")
def _(w: Work) -> Spec:
    return _encodes_after_export(w, _folded_minilm(w), w.dir() / "plain")


def _encodes_after_export(w: Work, folder: Path, out: Path) -> Spec:
    def check(res: Result) -> tuple[bool, str]:
        from sentence_transformers import SentenceTransformer

        from weightsmith import load
        from weightsmith.eval import load_tokenizer
        from weightsmith.eval.embeddings import embed
        from weightsmith.pooling import read_pooling

        lines = w.sentences.read_text().splitlines()[:8]
        ours = embed(load(folder), load_tokenizer(folder), lines, read_pooling(folder), 8, torch.device("cpu"), 128)
        theirs = SentenceTransformer(str(out), device="cpu").encode(lines, convert_to_tensor=True)
        diff = float((ours - theirs).abs().max())
        return diff < 1e-5, f"exported; max |embedding difference| {diff:.1e}"
    return Spec(ws("export", folder, "-o", out, "-q"), [folder], expect="ok", check=check, out=out)


@case("10", "eval --reference: cosine and Spearman of a folded MiniLM to the original")
def _(w: Work) -> Spec:
    folder = _folded_minilm(w)
    return Spec(ws("eval", folder, "--reference", w.minilm, "--data", w.sentences, "--json", "-q"),
                [folder, w.minilm], expect="ok", check=_printed("cosine", "spearman"))


# -- class 11: --dry-run is the real run's validation ---------------------------------------------------------------
@case("11", "run --dry-run: an eval stage over a tokenizer with a catastrophic regex")
def _(w: Work) -> Spec:
    d = w.dir()
    evil = {"type": "Split", "pattern": {"Regex": "(a|aa)*b"}, "behavior": "Isolated", "invert": False}
    model = w.variant(w.base, d / "model", edit=_tokenizer_edit(lambda t: t.update(pre_tokenizer=evil)))
    pipe = d / "pipe.yaml"
    pipe.write_text(f"name: p\nstages:\n  - name: e\n    stage: eval\n    inputs: [{model}]\n"
                    f"    params: {{data: {w.valid}, max_tokens: 2000}}\n")
    return Spec(ws("run", pipe, "--workdir", d / "work", "--dry-run"), [model, pipe])


def table(rows: list[dict], markdown: bool) -> str:
    head = ["class", "case", "exit", "first line of stderr", "inputs unchanged", "verdict", "s"]
    cells = [[r["cls"], r["case"], str(r["rc"]), r["line"], r["unchanged"], r["verdict"], f"{r['seconds']:.1f}"]
             for r in rows]
    if markdown:
        esc = [[c.replace("|", "\\|") for c in row] for row in cells]
        return "\n".join(["| " + " | ".join(head) + " |", "|" + "---|" * len(head)] +
                         ["| " + " | ".join(row) + " |" for row in esc])
    return "\n".join(" | ".join(row) for row in [head, *cells])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--only", default="", help="run one class (a number) or the cases whose name holds this text")
    ap.add_argument("--markdown", action="store_true", help="print the table as Markdown")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory(prefix="weightsmith-audit-") as tmp:
        work = Work(Path(tmp))
        rows = []
        try:
            for c in CASES:
                if args.only and (args.only != c.cls if args.only.isdigit() else args.only not in c.name):
                    continue
                rows.append(run_case(c, work))
                print(f"[{c.cls}] {c.name}: {rows[-1]['verdict']}", file=sys.stderr, flush=True)
        finally:
            for mnt in work.mounts:
                subprocess.run(["umount", str(mnt)], capture_output=True)
    print(table(rows, args.markdown))
    bad = [r for r in rows if r["verdict"].startswith("BAD")]
    print(f"\n{len(rows)} cases: {len(rows) - len(bad)} good, {len(bad)} bad, "
          f"{sum(r['verdict'] == 'skipped' for r in rows)} skipped")


if __name__ == "__main__":
    main()
