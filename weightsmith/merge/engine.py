"""The streaming merge engine: one tensor name at a time across all inputs, through a method, to disk.

Everything is validated from headers and configs before the first tensor is read. Peak memory is
the inputs' copies of the largest tensor (float32, on --device) plus the result; shards are written
in place by ShardedWriter. The engine knows no method by name: what a method takes and needs is its
declaration in the registry (``registry.Method``): parameters, base policy, hooks (``validate``,
``prepass``, ``rewrite``), its mergekit-arithmetic ``reference``, or a ``whole_model`` function for
methods that need whole models or data (greedy soup, PLeaS).

Arithmetic is float32 by default. Under ``compat: mergekit`` it is done in the recipe's ``dtype`` (as
mergekit does: by the method's ``reference`` when that dtype is not float32), and the output is
written in ``out_dtype`` (else ``dtype``).
"""
from __future__ import annotations

import collections
import re
import shutil
import time
import zlib
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import torch

from ..checkpoint import (Checkpoint, ShardedWriter, check_output, copy_side_files, detect_layout, output_folder,
                          parse_size, write_config)
from ..checkpoint.card import write_model_card
from ..device import resolve_device, resolve_dtype
from ..errors import MissingOption, OptionError, WeightsmithError, needs_option
from ..progress import ProgressFn, report
from ..stage_options import MergeOptions
from . import mixing
from .registry import Method, PlanCheck, check_param_names, get_method, resolve, resolve_globals
from .recipe import Recipe, resolve_recipe
from .values import ValueChecks, zero_requested

ADAPTER_WEIGHTS = "adapter_model.safetensors"
ADAPTER_CONFIG = "adapter_config.json"
# Config keys that must agree for tensors to mean the same thing; differing needs --allow-crimes.
ARCH_KEYS = ("model_type", "architectures", "hidden_size", "num_hidden_layers", "num_attention_heads",
             "num_key_value_heads", "intermediate_size", "n_embd", "n_layer", "n_head")
VOCAB_NAMES = re.compile(r"(embed_tokens|lm_head|wte|word_embeddings|embed_out|output)\.weight$")
PREFETCH_BYTES = 256 * 2**20
IN_FLIGHT = 2  # tensors merged at once on CPU


class _Ready:
    """A deferred load run when its result is asked for (no overlap for very large tensors)."""

    def __init__(self, fn, arg):
        self.fn, self.arg = fn, arg

    def result(self):
        return self.fn(self.arg)


@dataclass
class TensorJob:
    name: str
    shape: tuple[int, ...]
    dtype: torch.dtype
    kwargs: dict
    rows: int | None = None  # crop the vocabulary axis to this many rows
    float_math: bool = True
    compute: torch.dtype = torch.float32  # the arithmetic's dtype (not float32 only under compat: mergekit)
    inputs: list | None = None  # [(Checkpoint, tensor name)] for this job alone (layer stacking), base first
    base_in: bool | None = None  # whether ``inputs`` starts with the base
    prepare: object = None  # applied to the loaded inputs (vocabulary rows re-indexed to the output tokenizer)


@dataclass
class MergePlan:
    method: Method
    recipe: Recipe
    base: Checkpoint | None
    models: list[Checkpoint]
    jobs: list[TensorJob]
    reference: Checkpoint
    adapter: bool = False
    notes: list[str] = field(default_factory=list)
    card_parameters: dict = field(default_factory=dict)
    compat: str | None = None
    config: dict | None = None  # the output config when it is not the reference's (layer stacking)
    vocabulary: object = None  # tokenizer.OutputVocabulary when the recipe builds the output tokenizer


def _open(path: str, what: str) -> Checkpoint:
    if not Path(path).is_dir():
        raise WeightsmithError(f"{what} {path}: folder not found")
    return Checkpoint(path)


def _check_architectures(ckpts: list[Checkpoint], allow_crimes: bool) -> None:
    ref = ckpts[0]
    for c in ckpts[1:]:
        if (ref.config is None) != (c.config is None):
            raise WeightsmithError(f"{c.path}: one input has config.json and another has not; merge like with like")
        if ref.config is None:
            a, b = (ref.path / ADAPTER_CONFIG), (c.path / ADAPTER_CONFIG)
            if a.is_file() and b.is_file() and not allow_crimes:
                from ..checkpoint.adapters import read_adapter_config

                ka, kb = read_adapter_config(ref.path), read_adapter_config(c.path)
                for key in ("r", "target_modules", "base_model_name_or_path"):
                    if ka.get(key) != kb.get(key):
                        raise needs_option(f"{c.path}: adapter {key} {kb.get(key)!r} differs from {ref.path}'s "
                                           f"{ka.get(key)!r}", "; {0} merges them anyway", "allow_crimes")
            continue
        for key in ARCH_KEYS:
            if ref.config.get(key) != c.config.get(key) and not allow_crimes:
                raise needs_option(
                    f"{c.path}: config {key} = {c.config.get(key)!r} but {ref.path} has {ref.config.get(key)!r}; "
                    "these models do not share an architecture", " ({0} merges them anyway)", "allow_crimes")


def _depths(ref: Checkpoint) -> dict[str, float]:
    """Relative depth t of every tensor (block i of L -> i/(L-1)); non-block tensors get 0 as in mergekit."""
    names = ref.names()
    try:
        layout = detect_layout(ref.config, names, str(ref.path))
        block_of, n = layout.block_of, layout.num_blocks
    except WeightsmithError:
        pat = re.compile(r"\.(\d+)\.")
        def block_of(name: str) -> int | None:
            m = pat.search(name)
            return int(m.group(1)) if m else None
        found = [b for b in map(block_of, names) if b is not None]
        n = max(found) + 1 if found else 0
    out = {}
    for name in names:
        b = block_of(name)
        out[name] = 0.0 if b is None else (b / (n - 1) if n > 1 else 1.0)
    return out


def _compat(method: Method, recipe: Recipe, where: str) -> str | None:
    p = method.param("compat")
    return resolve(p, recipe.parameters.get("compat"), "", 0.0, where, None, True) if p else None


def plan_merge(recipe: Recipe, *, dtype: str | None = None, allow_crimes: bool = False) -> MergePlan:
    """Open headers, check architectures, names, shapes and every parameter for every tensor; read no tensor.

    ``dtype`` (the output dtype a run asks for) overrides the recipe's; the arithmetic's dtype is float32,
    or the recipe's ``dtype`` under compat: mergekit."""
    from .tokenizer import attach_vocabulary

    get_method(recipe.method)  # an unknown method is refused before any model is fetched
    recipe = resolve_recipe(recipe)
    where = "recipe"
    if recipe.slices is not None:
        from .slices import plan_slice_merge
        return attach_vocabulary(plan_slice_merge(recipe, dtype=dtype, allow_crimes=allow_crimes))
    recipe, method, notes, card_params = _method_of(recipe, where)
    compat = _compat(method, recipe, where)
    base, entries, models = _open_inputs(recipe, method)
    everyone = ([base] if base else []) + models
    _check_architectures(everyone, allow_crimes)
    reference = base or models[0]
    adapter = (reference.path / ADAPTER_WEIGHTS).is_file() and reference.config is None
    out_dtype = resolve_dtype(dtype or recipe.out_dtype or recipe.dtype)
    math_dtype = resolve_dtype(recipe.dtype) if compat == "mergekit" else torch.float32
    if compat == "mergekit" and recipe.dtype and recipe.out_dtype and not dtype:
        notes.append(f"arithmetic in {recipe.dtype}, written as {recipe.out_dtype} (as mergekit)")
    _check_same_names(everyone, reference)
    depth = _depths(reference)
    jobs = []
    for name in reference.names():
        shape, rows = _common_shape(everyone, name, notes)
        kwargs = _tensor_kwargs(method, recipe, entries, name, depth[name], where, compat)
        in_dtype = reference.info(name).torch_dtype
        float_math = in_dtype.is_floating_point
        compute = math_dtype or _promoted(everyone, name)
        jobs.append(TensorJob(name, shape, out_dtype if (out_dtype and float_math) else in_dtype, kwargs, rows,
                              float_math, compute if float_math else in_dtype))
    if method.validate is not None:
        method.validate(PlanCheck(method, [m.path for m in entries], [(j.name, j.kwargs) for j in jobs if j.float_math],
                                  where, compat))
    if not card_params:
        card_params = {p.name: recipe.parameters.get(p.name, p.default) for p in method.params}
    return attach_vocabulary(MergePlan(method, recipe, base, models, jobs, reference, adapter, notes, card_params,
                                       compat))


def _method_of(recipe: Recipe, where: str) -> tuple[Recipe, Method, list[str], dict]:
    """The method that runs (after a ``rewrite`` hook turned the recipe into another method's), with the notes
    and the model card's parameters the rewrite gave."""
    method = get_method(recipe.method)
    notes = check_param_names(method, recipe, where, _compat(method, recipe, where))
    card_params: dict = {}
    if method.rewrite is not None:
        recipe, card_params = method.rewrite(recipe, resolve_globals(method, recipe, where), where)
        method = get_method(recipe.method)
        notes += check_param_names(method, recipe, where, _compat(method, recipe, where))
    return recipe, method, notes, card_params


def _open_inputs(recipe: Recipe, method: Method) -> tuple[Checkpoint | None, list, list[Checkpoint]]:
    """The base (None when the recipe has none), the model entries besides it and their checkpoints."""
    base = _open(recipe.base_model, "base_model") if recipe.base_model else None
    if method.base == "required" and base is None:
        raise MissingOption("base_model", f"method {method.name!r} needs a base model")
    takes_base = base is not None and method.base in ("required", "optional")
    entries = [m for m in recipe.models if not (takes_base and Path(m.path).resolve() == base.path.resolve())]
    if len(entries) < method.min_models:
        raise WeightsmithError(f"method {method.name!r} needs at least {method.min_models} model(s) besides the base, "
                               f"got {len(entries)}")
    if method.max_models is not None and len(entries) > method.max_models:
        raise WeightsmithError(f"method {method.name!r} takes at most {method.max_models} model(s) besides the base, "
                               f"got {len(entries)}")
    return base, entries, [_open(m.path, "model") for m in entries]


def _check_same_names(everyone: list[Checkpoint], reference: Checkpoint) -> None:
    ref_names = reference.names()
    for c in everyone:
        missing = [n for n in ref_names if n not in c]
        extra = [n for n in c.names() if n not in reference]
        if missing:
            raise WeightsmithError(f"{c.path}: has no tensor {missing[0]!r} (present in {reference.path})"
                                   + (f" and {len(missing) - 1} more" if len(missing) > 1 else ""))
        if extra:
            raise WeightsmithError(f"{c.path}: tensor {extra[0]!r} is not in {reference.path}")


def _common_shape(everyone: list[Checkpoint], name: str, notes: list[str]) -> tuple[tuple[int, ...], int | None]:
    """The output shape of tensor ``name`` and the vocabulary rows it is cropped to (None: not cropped)."""
    shapes = [tuple(c.info(name).shape) for c in everyone]
    shape, rows = shapes[0], None
    if any(s != shape for s in shapes):
        same_tail = all(len(s) == len(shape) and s[1:] == shape[1:] for s in shapes)
        if not (same_tail and VOCAB_NAMES.search(name)):
            odd = next(c for c, s in zip(everyone, shapes) if s != shapes[0])
            raise WeightsmithError(f"{odd.path}: tensor {name!r} has shape {list(odd.info(name).shape)} but "
                                   f"{everyone[0].path} has {list(shapes[0])}")
        rows = min(s[0] for s in shapes)
        shape = (rows, *shape[1:])
        notes.append(f"{name}: vocabulary rows differ {sorted({s[0] for s in shapes})}; cropped to the first {rows}")
    return shape, rows


def _tensor_kwargs(method: Method, recipe: Recipe, entries: list, name: str, t: float, where: str,
                   compat: str | None) -> dict:
    """The method's keyword arguments for one tensor at relative depth ``t``: every parameter resolved and
    checked (one passed only as a check when it has no keyword)."""
    kwargs: dict = {}
    for p in method.params:
        if p.scope == "global":
            value = resolve(p, recipe.parameters.get(p.name), name, t, f"{where}: {name}", compat,
                            p.name in recipe.parameters)
        else:
            value = []
            for m in entries:
                explicit = p.name in m.parameters or p.name in recipe.parameters
                setting = m.parameters.get(p.name, recipe.parameters.get(p.name))
                value.append(resolve(p, setting, name, t, f"{where}: model {m.path}: {name}", compat, explicit))
        if p.keyword is not None:
            kwargs[p.keyword] = value
    if method.inplace:
        kwargs["inplace"] = True
    return kwargs


def _promoted(ckpts: list[Checkpoint], name: str) -> torch.dtype:
    """mergekit's compute dtype when the recipe gives none: the inputs' dtypes promoted."""
    dt = ckpts[0].info(name).torch_dtype
    for c in ckpts[1:]:
        dt = torch.promote_types(dt, c.info(name).torch_dtype)
    return dt


def _generator(seed: int, name: str, index: int) -> torch.Generator:
    """One generator per (seed, tensor, model): the same seed gives the same output in any order."""
    g = torch.Generator()
    g.manual_seed((seed * 1_000_003 + zlib.crc32(f"{name}#{index}".encode())) % (2**63))
    return g


def run_job(plan: MergePlan, job: TensorJob, tensors: list[torch.Tensor], base: torch.Tensor | None,
            seed: int) -> torch.Tensor:
    """Apply the method to one tensor's inputs (already cropped and float32 on the device)."""
    if not job.float_math:
        return (base if base is not None else tensors[0])
    kwargs = dict(job.kwargs)
    method = plan.method
    if method.random:
        kwargs["generators"] = [_generator(seed, job.name, i) for i in range(len(tensors))]
    mergekit = plan.compat == "mergekit" and (job.compute != torch.float32 or not method.compat_fast)
    fn = method.reference if (mergekit and method.reference is not None) else method.fn
    if method.base == "required" or (method.base == "optional" and base is not None):
        return fn(tensors, base, **kwargs)
    return fn(tensors, **kwargs)


def _read(ckpt: Checkpoint, job: TensorJob, device: torch.device, name: str | None = None) -> torch.Tensor:
    """The tensor (in the job's compute dtype for float math) on ``device``, cropped to the job's rows,
    which the method may overwrite: on CPU a tensor already in that dtype (or non-float) is a private
    copy-on-write mapping of the file, so reading it copies nothing and the file never changes;
    otherwise an owned copy (on CPU converted from that mapping in one pass). ``name``: the tensor's name in ``ckpt`` when not the job's."""
    name = name or job.name
    if device.type == "cpu" and (not job.float_math or ckpt.info(name).torch_dtype == job.compute):
        return ckpt.map(name, job.rows)
    if device.type == "cpu":  # converted straight from the mapped file: one pass, no intermediate copy
        return ckpt.map(name, job.rows).to(job.compute)
    return ckpt.read(name, job.rows, job.compute if job.float_math else None, device)


def merge(recipe: Recipe, out: str | Path, opts: MergeOptions | None = None, *, device: str = "auto", seed: int = 0,
          force: bool = False, progress: ProgressFn | None = None, metrics: list[dict] | None = None,
          **options) -> dict:
    """Run ``recipe`` into the folder ``out`` as ``opts`` says; returns a report dict (inputs, method, tensors,
    notes, seconds). Keywords naming ``MergeOptions`` fields replace them (``dtype=``, ``out_shard_size=``,
    ``allow_crimes=``, ...); any others go to a whole-model method (e.g. greedy soup's).

    ``out_shard_size``: bytes, or text as ``checkpoint.parse_size`` reads it (``5B`` = 5e9 bytes, as mergekit)."""
    known = MergeOptions.specs()
    opts = MergeOptions.build(opts, **{k: v for k, v in options.items() if k in known})
    extra = {k: v for k, v in options.items() if k not in known}
    parse_size(opts.out_shard_size)  # a bad size is refused before any input is opened
    method = get_method(recipe.method)
    recipe = resolve_recipe(recipe)  # options checked above: now the models are fetched if they must be
    if method.whole_model:
        return _whole_model(method, recipe, out, opts, device=device, seed=seed, force=force, progress=progress,
                            extra=extra)
    if extra:
        raise WeightsmithError(f"method {method.name!r} does not take {', '.join(sorted(extra))}")
    plan = plan_merge(recipe, dtype=opts.dtype, allow_crimes=opts.allow_crimes)
    dev = resolve_device(device)
    uses_base = plan.base is not None and plan.method.base in ("required", "optional")
    sources = ([plan.base] if uses_base else []) + plan.models
    checks = ValueChecks(plan, sources, opts.allow_nonfinite)  # its header checks: before the output check ends a dry run
    check_output(out, recipe.inputs, force)
    start = time.perf_counter()
    if plan.method.prepass is not None:
        def stream(jobs):
            for job in jobs:
                yield [_read(c, job, dev) for c in sources]
        plan.method.prepass([j for j in plan.jobs if j.float_math], stream, progress)
    with output_folder(out, recipe.inputs, force, stage="merge", values_checked=True) as tmp:
        shard = "1000TB" if plan.adapter else parse_size(opts.out_shard_size)
        writer = ShardedWriter(tmp, [(j.name, j.dtype, j.shape) for j in plan.jobs], shard)
        execute(plan, _Inputs(plan, sources, uses_base, dev), writer, checks, seed=seed, progress=progress)
        writer.close()
        _write_beside(plan, tmp, opts)
        if opts.model_card:
            _write_card(plan, tmp, opts, seed, metrics)
    return {"out": str(out), "method": recipe.method, "inputs": recipe.inputs, "tensors": len(plan.jobs),
            "notes": plan.notes, "parameters": plan.card_parameters, "seconds": round(time.perf_counter() - start, 3),
            **({"nonfinite": checks.report} if checks.report else {})}


def _whole_model(method: Method, recipe: Recipe, out: str | Path, opts: MergeOptions, *, device: str, seed: int,
                 force: bool, progress: ProgressFn | None, extra: dict) -> dict:
    """A method that needs whole models or data: its parameters checked here, the rest is its own function's."""
    check_param_names(method, recipe, "recipe", None)
    for p in method.params:
        if recipe.parameters.get(p.name) is not None:
            p.check(recipe.parameters[p.name], "recipe")
    fn = method.whole_model_fn()
    import inspect

    takes = inspect.signature(fn).parameters
    unknown = sorted(k for k in extra if k not in takes)
    if unknown:  # never dropped in silence: a whole-model method's data and settings are recipe parameters
        raise WeightsmithError(f"method {method.name!r} takes no option {', '.join(map(repr, unknown))}; give its "
                               f"settings as recipe parameters ({', '.join(p.name for p in method.params)})")
    return fn(recipe, out, device=device, dtype=opts.dtype, out_shard_size=parse_size(opts.out_shard_size), seed=seed,
              allow_crimes=opts.allow_crimes, force=force, progress=progress, copy_tokenizer=opts.copy_tokenizer,
              model_card=opts.model_card, allow_nonfinite=opts.allow_nonfinite, **extra)


class _Inputs:
    """Each job's input tensors (base first when the method takes it), read on ``device``."""

    def __init__(self, plan: MergePlan, sources: list[Checkpoint], uses_base: bool, device: torch.device):
        self.sources, self.uses_base, self.device = sources, uses_base, device
        self.largest = max((self.footprint(j) for j in plan.jobs), default=0)

    def load(self, job: TensorJob) -> list[torch.Tensor]:
        if job.inputs is not None:
            xs = [_read(c, job, self.device, n) for c, n in job.inputs]
        else:
            xs = [_read(c, job, self.device) for c in self.sources]
        return job.prepare(xs) if job.prepare is not None else xs

    def footprint(self, job: TensorJob) -> int:
        return job.compute.itemsize * len(job.inputs or self.sources) * torch.Size(job.shape).numel()

    def fits(self, held: list[TensorJob]) -> bool:
        """Whether holding these jobs' inputs at once keeps the peak within PREFETCH_BYTES of the largest job's."""
        return sum(self.footprint(j) for j in held) <= self.largest + PREFETCH_BYTES

    def split(self, job: TensorJob, inputs: list[torch.Tensor]) -> tuple[torch.Tensor | None, list[torch.Tensor]]:
        """(base or None, the other tensors) of a job's loaded inputs."""
        with_base = self.uses_base if job.base_in is None else job.base_in
        return (inputs[0], inputs[1:]) if with_base else (None, inputs)


def execute(plan: MergePlan, inputs: _Inputs, writer: ShardedWriter, checks: ValueChecks, *, seed: int,
            progress: ProgressFn | None = None) -> None:
    """Merge every job of ``plan`` into ``writer``, results written in the plan's order. Reading the next
    tensor, writing the last result and, on CPU, the math of two tensors overlap (one tensor's sort replays
    and reductions leave cores idle that the next one's fill), unless that would raise the peak memory:
    the inputs held at once stay within PREFETCH_BYTES of the largest job's (``_Inputs.fits``)."""
    label = f"merge {plan.recipe.method}"
    jobs = plan.jobs
    report(progress, label, 0, len(jobs))
    in_flight = IN_FLIGHT if inputs.device.type == "cpu" else 1
    order = {job.name: i for i, job in enumerate(jobs)}

    def compute(job: TensorJob, loaded: list[torch.Tensor]) -> torch.Tensor:
        base, tensors = inputs.split(job, loaded)
        paths = [c.path for c, _ in job.inputs] if job.inputs is not None else None
        return checks.run(job.name, loaded, lambda: run_job(plan, job, tensors, base, seed).to(job.dtype).cpu(),
                          paths, zero_requested(job.kwargs))
    try:
        with ThreadPoolExecutor(max_workers=1) as reader, ThreadPoolExecutor(max_workers=1) as writing, \
                ThreadPoolExecutor(max_workers=in_flight) as math:
            running: collections.deque = collections.deque()  # (job, future of its result), in plan order
            written = None
            done = 0

            def finish_oldest() -> None:
                nonlocal written, done
                job, future = running.popleft()
                result = future.result()
                if written is not None:
                    written.result()
                written = writing.submit(writer.write, job.name, result)
                done += 1
                report(progress, label, done, len(jobs))

            pending = reader.submit(inputs.load, jobs[0]) if jobs else None
            for i, job in enumerate(jobs):
                if isinstance(pending, _Ready):  # read only once it fits beside what is still running
                    while running and not inputs.fits([j for j, _ in running] + [job]):
                        finish_oldest()
                loaded = pending.result()
                nxt = jobs[i + 1] if i + 1 < len(jobs) else None
                # wait for older tensors while this one would not fit beside them (with the next one read ahead)
                while running and (len(running) >= in_flight or not inputs.fits([j for j, _ in running] + [job])):
                    finish_oldest()
                pending = None
                if nxt is not None:
                    pending = (reader.submit(inputs.load, nxt) if inputs.fits([j for j, _ in running] + [job, nxt])
                               else _Ready(inputs.load, nxt))
                running.append((job, math.submit(compute, job, loaded)))
                del loaded
            while running:
                finish_oldest()
            if written is not None:
                written.result()
    finally:
        mixing.release_scratch()
    checks.report.sort(key=lambda r: order.get(r["tensor"], len(order)))  # tensors finish in any order


def _write_beside(plan: MergePlan, tmp: Path, opts: MergeOptions) -> None:
    """What goes beside the weights: the adapter config or the model config, and the tokenizer."""
    recipe = plan.recipe
    if plan.adapter:
        (tmp / "model.safetensors").rename(tmp / ADAPTER_WEIGHTS)
        shutil.copy2(plan.reference.path / ADAPTER_CONFIG, tmp / ADAPTER_CONFIG)
    else:
        config = dict(plan.config or plan.reference.config or {})
        rows = next((j.rows for j in plan.jobs if j.rows is not None), None)
        if plan.vocabulary is not None and plan.vocabulary.rows_out is not None:
            rows = plan.vocabulary.rows_out
        if rows is not None and "vocab_size" in config:
            config["vocab_size"] = rows
        out_dt = resolve_dtype(opts.dtype or recipe.out_dtype or recipe.dtype)
        if out_dt is not None:
            key = "dtype" if "dtype" in config or "torch_dtype" not in config else "torch_dtype"
            config[key] = str(out_dt).removeprefix("torch.")
        write_config(tmp, config)
    if opts.copy_tokenizer:
        copy_side_files(plan.reference.path, tmp)
    if plan.vocabulary is not None and (opts.copy_tokenizer or plan.vocabulary.rows_out is not None):
        plan.vocabulary.write(tmp)
    elif plan.vocabulary is not None:
        plan.notes.append("chat_template not written: the tokenizer is not copied (--no-copy-tokenizer)")


def _write_card(plan: MergePlan, tmp: Path, opts: MergeOptions, seed: int, metrics: list[dict] | None) -> None:
    recipe = plan.recipe
    notes = "\n".join(f"- {n}" for n in plan.notes) or None
    arithmetic = str(plan.jobs[0].compute if plan.jobs else torch.float32).removeprefix("torch.")
    write_model_card(tmp, stage="merge", method=recipe.method, inputs=recipe.inputs,
                     parameters={**plan.card_parameters, "seed": seed,
                                 "dtype": str(opts.dtype or recipe.out_dtype or recipe.dtype or "as input"),
                                 "arithmetic": arithmetic},
                     recipe=recipe.text or recipe.to_yaml(), notes=notes, metrics=metrics)
