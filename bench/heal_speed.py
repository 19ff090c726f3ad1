"""Heal throughput: weightsmith's heal (accelerate, distillation from the original), with and without the
teacher's outputs cached (--teacher-cache), against plain PyTorch loops on the same folded model, batch and
sequence length:

  plain distil: the same objective written as a bare loop (teacher forward, student forward, losses,
                backward, clip, AdamW), so the ratio is what heal's machinery costs;
  plain LM:     a bare LM fine-tune (student forward with labels, backward, AdamW), no teacher at all.

With --sentences (MiniLM): the heal as an encoder is healed, one calibration sentence per input, against the
same distillation as a bare loop that pads each batch to its longest sentence (as a tokenizer call with
padding=True does); the rates count real tokens, not padding.

    .venv/bin/python bench/heal_speed.py [--model zoo|minilm] [--sentences] [--steps 30] [--batch-size 8] [--seq 128]
"""
from __future__ import annotations

import argparse
import time

import torch
import torch.nn.functional as F

import weightsmith
from weightsmith.checkpoint import read_json
from weightsmith.eval import load_tokenizer
from weightsmith.fold.blocks import block_list, is_causal_lm
from weightsmith.data import calibration_windows
from weightsmith.fold.heal import heal
from weightsmith.fold.plan import fold_model
from weightsmith.pooling import read_pooling
from weightsmith.data import Sentences, calibration_sentences
from weightsmith.zoo import build, minilm_path


def folded_pair(path, removed):
    teacher = weightsmith.load(path)
    cfg = read_json(path / "config.json", "config")
    n = len(block_list(teacher))
    return teacher, fold_model(teacher, cfg, removed, [1] * (n - len(removed)))


def bare_setup(student):
    """What both bare loops train: the blocks' weights only, AdamW, dropout off; and their batch generator."""
    for p in student.parameters():
        p.requires_grad_(False)
    params = list(block_list(student).parameters())
    for p in params:
        p.requires_grad_(True)
    student.eval()
    return params, torch.optim.AdamW(params, lr=1e-4, weight_decay=0.0), torch.Generator().manual_seed(0)


def plain_loop(student, teacher, windows, steps, batch, distil, pooling):
    causal = is_causal_lm(teacher)
    params, opt, gen = bare_setup(student)
    t0 = None
    for step in range(steps + 3):
        if step == 3:
            t0 = time.perf_counter()
        x = windows[torch.randint(0, windows.shape[0], (batch,), generator=gen)]
        if not distil:
            out = student(input_ids=x, labels=x) if causal else student(input_ids=x)
            loss = out.loss if causal else out.last_hidden_state.pow(2).mean()
        else:
            with torch.no_grad():
                t = teacher(input_ids=x, output_hidden_states=True)
            s = student(input_ids=x, output_hidden_states=True, labels=x if causal else None)
            loss = sum(F.mse_loss(s.hidden_states[-1 - i], t.hidden_states[-1 - i]) for i in range(2)) / 2
            if causal:
                kd = F.kl_div(F.log_softmax(s.logits / 2, -1), F.log_softmax(t.logits / 2, -1), log_target=True,
                              reduction="batchmean") * 4 / x.shape[1]
                loss = loss + kd + s.loss
            else:
                loss = loss + (1 - F.cosine_similarity(pooling(s.last_hidden_state), pooling(t.last_hidden_state))).mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
    return steps * batch * windows.shape[1] / (time.perf_counter() - t0)


def plain_sentences_loop(student, teacher, data, steps, batch, pooling):
    """The encoder distillation as a bare loop on whole batches padded to their longest sentence."""
    from weightsmith.fold.heal import _mse

    params, opt, gen = bare_setup(student)
    t0, real = None, 0
    for step in range(steps + 3):
        if step == 3:
            t0, real = time.perf_counter(), 0
        x, mask = data.batch(torch.randint(0, len(data), (batch,), generator=gen).tolist())
        real += int(mask.sum())
        with torch.no_grad():
            t = teacher(input_ids=x, attention_mask=mask, output_hidden_states=True)
        s = student(input_ids=x, attention_mask=mask, output_hidden_states=True)
        loss = sum(_mse(s.hidden_states[-1 - i], t.hidden_states[-1 - i], mask) for i in range(2)) / 2
        loss = loss + (1 - F.cosine_similarity(pooling(s.last_hidden_state, mask),
                                               pooling(t.last_hidden_state, mask))).mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
    return real / (time.perf_counter() - t0)


def sentence_tokens(data, steps, batch) -> int:
    """Real tokens in the batches heal draws (its generator, seed 0) in ``steps`` steps."""
    gen = torch.Generator().manual_seed(0)
    draws = [torch.randint(0, len(data), (batch,), generator=gen) for _ in range(steps)]
    return sum(len(data.ids[i]) for d in draws for i in d.tolist())


def heal_rate(student, teacher, windows, steps, batch, pooling, setup: float = 0.0, **options):
    """Heal tokens per second (``setup``: seconds of the run not counted, such as building a teacher cache)."""
    heal(student, teacher, windows, steps=3, batch_size=batch, pooling=pooling, **options)  # warm-up, as the loops get
    t0 = time.perf_counter()
    heal(student, teacher, windows, steps=steps, batch_size=batch, pooling=pooling, **options)
    tokens = sentence_tokens(windows, steps, batch) if isinstance(windows, Sentences) else steps * batch * windows.shape[1]
    return tokens / (time.perf_counter() - t0 - setup)


def cache_seconds(teacher, windows, batch) -> float:
    """The time ``heal(teacher_cache=True)`` spends computing the teacher's outputs before its first step."""
    from weightsmith.fold.teacher_cache import TeacherCache

    t0 = time.perf_counter()
    TeacherCache(teacher, windows, tail=2, causal=is_causal_lm(teacher), batch_size=batch)
    return time.perf_counter() - t0


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", choices=("zoo", "minilm"), default="zoo")
    ap.add_argument("--steps", type=int, default=30)
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--seq", type=int, default=128)
    ap.add_argument("--size", default="tiny")
    ap.add_argument("--sentences", action="store_true", help="MiniLM: heal on single padded sentences")
    args = ap.parse_args()
    torch.set_num_threads(1)
    if args.model == "zoo":
        zoo = build(args.size)
        path, data, removed = zoo.model("base"), zoo.data("general", "calib"), [1]
    else:
        from tempfile import mkdtemp

        from weightsmith.fold.english import write_calibration
        path, removed = minilm_path(), [2]
        data = write_calibration(mkdtemp() + "/calib.txt")
    teacher, _ = folded_pair(path, removed)
    pooling = None if is_causal_lm(teacher) else read_pooling(path)
    if args.sentences:
        if pooling is None:
            raise SystemExit("--sentences is for an encoder (--model minilm)")
        return sentence_rates(path, removed, teacher, data, args, pooling)
    windows = calibration_windows(load_tokenizer(path), data, seq_len=args.seq, max_tokens=64 * args.seq,
                                  causal=is_causal_lm(teacher))
    rates = {}
    cache_s = cache_seconds(teacher, windows, args.batch_size)
    for name in ("heal", "cached", "cached steps", "plain distil", "plain LM", "heal"):  # heal first and last: drift
        _, student = folded_pair(path, removed)
        if name == "heal":
            rates.setdefault(name, []).append(heal_rate(student, teacher, windows, args.steps, args.batch_size, pooling))
        elif name.startswith("cached"):
            rates[name] = [heal_rate(student, teacher, windows, args.steps, args.batch_size, pooling, teacher_cache=True,
                                     setup=cache_s if name == "cached steps" else 0.0)]
        else:
            rates[name] = [plain_loop(student, teacher, windows, args.steps, args.batch_size, name == "plain distil",
                                      pooling or read_pooling(path))]
    h = sum(rates["heal"]) / len(rates["heal"])
    print(f"{args.model} ({path.name}) with block(s) {removed} removed, batch {args.batch_size} x seq {args.seq}, "
          f"{args.steps} steps, 1 thread")
    print("| loop | tokens/s | heal / loop |")
    print("|---|---|---|")
    print(f"| weightsmith heal | {h:,.0f} | 1.00 |")
    for name, what in (("cached", "its build included"), ("cached steps", "steps only")):
        print(f"| weightsmith heal --teacher-cache ({windows.shape[0]} windows; {what}) | {rates[name][0]:,.0f} | "
              f"{h / rates[name][0]:.2f} |")
    for name in ("plain distil", "plain LM"):
        print(f"| {name} | {rates[name][0]:,.0f} | {h / rates[name][0]:.2f} |")


def sentence_rates(path, removed, teacher, data, args, pooling) -> None:
    sentences = calibration_sentences(load_tokenizer(path), data, seq_len=args.seq, max_tokens=1_000_000)
    rates = {}
    for name in ("heal", "padded batches", "heal"):
        _, student = folded_pair(path, removed)
        rate = (heal_rate(student, teacher, sentences, args.steps, args.batch_size, pooling) if name == "heal" else
                plain_sentences_loop(student, teacher, sentences, args.steps, args.batch_size, pooling))
        rates.setdefault(name, []).append(rate)
    h = sum(rates["heal"]) / len(rates["heal"])
    print(f"minilm ({path.name}) with block(s) {removed} removed, batches of {args.batch_size} sentences "
          f"({len(sentences)} calibration sentences), {args.steps} steps, 1 thread; real tokens/s")
    print("| loop | real tokens/s | heal / loop |")
    print("|---|---|---|")
    print(f"| weightsmith heal (length groups) | {h:,.0f} | 1.00 |")
    p = rates["padded batches"][0]
    print(f"| bare loop, each batch padded to its longest | {p:,.0f} | {h / p:.2f} |")

if __name__ == "__main__":
    main()
