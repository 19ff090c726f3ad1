"""The stages' options (see ``weightsmith.options``): one class per stage, read by its command, its pipeline
adapter and its library function. Kept free of heavy imports so ``weightsmith --help`` stays fast.
"""
from __future__ import annotations

from pathlib import Path

from .errors import MissingOption, OptionError
from .options import (DTYPES, Options, batch_size_option, max_tokens_option, option, out_shard_size_option,
                      seq_len_option)

# choices that the library modules dispatch on (they import these tuples from here)
RPS_MAPPINGS = ("stable", "roast")
RPS_SHARING = ("global", "module")
ALIGN_METHODS = ("weight", "activation")
MATCH_METRICS = ("euclidean", "correlation")
PLEAS_INPUTS = ("merged", "original")
FOLD_IMPORTANCE = ("loss", "gates", "bi", "angular")
SHARE_INITS = ("average", "first", "middle", "best")
HEAL_OPTIMIZERS = ("adamw", "adafactor")
LORA_RANKS = ("max", "auto")
LORA_SVD = ("auto", "exact", "lowrank")

_METRIC_HELP = "Activation similarity: euclidean (−Σ‖a−b‖², as the PLeaS reference code) or correlation."


class EvalOptions(Options):
    """``weightsmith eval``: perplexity and accuracy of model folders."""
    data: Path | None = option(None, path=True, help="Text file, folder of .txt files, or .jsonl with a 'text' field "
                                                     "(perplexity).")
    labelled: Path | None = option(None, path=True, help="jsonl/CSV with 'label' and 'text' (accuracy of "
                                   "*ForSequenceClassification models) or 'image', a file path relative to the data "
                                   "file (*ForImageClassification models, prepared by the folder's image processor).")
    tokenizer: Path | None = option(None, path=True, help="Tokenizer folder (default: each model's own).")
    context: int | None = option(None, lo=2, help="Window length in tokens (default: the model's max positions).")
    stride: int | None = option(None, lo=1, help="Sliding-window stride (default: context/2).")
    max_tokens: int | None = max_tokens_option(None, help="Use at most this many tokens of the text data.")
    batch_size: int = batch_size_option(8, help="Windows or examples per forward pass.")
    dtype: str | None = option(None, choices=DTYPES, help="Run in float32, bfloat16 or float16 (default: as stored).")
    reference: Path | None = option(None, path=True, help="Encoders: the original model; scores each --data line's "
                                    "sentence embedding against the original's (cosine, Spearman of pairwise "
                                    "similarities).")

    def check(self) -> None:
        if self.reference is not None and self.data is None:
            raise MissingOption("data", "a {0} needs sentences to embed, one per line", ("reference",))
        if self.data is None and self.labelled is None:
            raise OptionError(None, "nothing to measure: give {0} (text, for perplexity) and/or {1} (labelled "
                                    "file, for accuracy)", ("data", "labelled"))


class AnalyzeOptions(Options):
    """``weightsmith analyze``: per-block similarity from one forward pass."""
    data: Path = option(path=True, help="Calibration text (.txt/.md/.jsonl file or folder).")
    remove: float = option(0.25, lo=0, hi=1, hi_open=True, help="Fraction of blocks the drop suggestions remove.")
    seq_len: int | None = seq_len_option(None, help="Tokens per window (default: min(positions, 128)).")
    max_tokens: int = max_tokens_option(4096)
    batch_size: int = batch_size_option(8)
    tokenizer: Path | None = option(None, path=True, help="Tokenizer folder (default: the model's own).")
    dtype: str | None = option(None, choices=DTYPES, help="Run in float32, bfloat16 or float16 (default: as stored).")


class RpsOptions(Options):
    """``weightsmith compress rps``: randomized parameter sharing under a budget."""
    budget: float = option(0.1, lo=0, hi=4, lo_open=True, help="Stored / original parameters of the compressed "
                                                                 "modules.")
    mapping: str = option("stable", choices=RPS_MAPPINGS, help="stable (RandomFold + gradient scaling) or roast "
                                                               "(hashed tiles).")
    modules: str | None = option(None, help="Regex over module names (nn.Linear / nn.Embedding) to compress. Default: "
                                 "every nn.Linear inside the transformer blocks, not embeddings, lm_head or norms.")
    sharing: str = option("global", choices=RPS_SHARING, help="global: one memory for all modules; module: one per "
                                                               "module.")
    tile: int = option(64, lo=1, help="ROAST tile size in weights.")
    heal_steps: int = option(0, lo=0, help="Fine-tuning steps on the data after projecting (0: none).")
    data: Path | None = option(None, path=True, help="Text file for healing / training.")
    lr: float | None = option(None, lo=0, lo_open=True, help="Peak learning rate (default: 1e-3 healing, 4e-3 "
                                                             "training).")
    batch_size: int = batch_size_option(16, help="Sequences per step.")
    seq_len: int = seq_len_option(64, help="Tokens per sequence.")
    from_config: Path | None = option(None, pipeline=False, help="config.json or model folder: build an RPS model from "
                                      "scratch instead of projecting MODEL.")
    train: bool = option(False, pipeline=False, help="With --from-config: train the new model on --data.")
    train_steps: int = option(500, lo=0, pipeline=False, help="Training steps with --from-config --train.")
    tokenizer: Path | None = option(None, pipeline=False, help="Tokenizer folder (default: beside the model/config).")

    def check(self) -> None:
        if self.heal_steps and self.data is None:
            raise MissingOption("data", "healing ({0} > 0) needs text to train on", ("heal_steps",))


class AlignOptions(Options):
    """``weightsmith align``: permute model B into model A's basis."""
    method: str = option("weight", choices=ALIGN_METHODS, help="weight: Git Re-Basin weight matching, no data; "
                                                               "activation: matching on activations over the data.")
    data: Path | None = option(None, path=True, help="Calibration text (needed by activation matching).")
    metric: str = option("euclidean", choices=MATCH_METRICS, help=_METRIC_HELP)
    max_tokens: int = max_tokens_option(8192)
    seq_len: int = seq_len_option(128)
    batch_size: int = batch_size_option(8)
    max_sweeps: int = option(100, lo=1, help="Weight matching: most coordinate-descent sweeps over the groups.")
    out_shard_size: str = out_shard_size_option()  # bytes (an int) once built

    def check(self) -> None:
        if self.method == "activation" and self.data is None:
            raise MissingOption("data", "activation matching ({0} activation) needs calibration text", ("method",))


class PleasOptions(Options):
    """``weightsmith pleas`` (and merge method ``pleas``): merge two models into one of width× size."""
    data: Path = option(path=True, help="Calibration text: the fine-tuning data, or generic text (data-free).")
    width: float = option(1.2, lo=1.0, hi=2.0, help="Size in model multiples, 1.0-2.0: each widening group keeps "
                                                    "width×n units (Llama: the MLP intermediate).")
    metric: str = option("euclidean", choices=MATCH_METRICS, help=_METRIC_HELP)
    ridge: float = option(1e-4, lo=0, help="Least-squares ridge, relative to the mean Gram diagonal.")
    least_squares: bool = option(True, help="Refit every layer in closed form (off: ZipIt!-style partial zip).")
    inputs: str = option("merged", choices=PLEAS_INPUTS, help="Least-squares inputs: merged (the merged model's own, "
                                                              "layer by layer) or original (both models', one pass).")
    max_tokens: int = max_tokens_option(8192)
    seq_len: int = seq_len_option(128)
    batch_size: int = batch_size_option(8)
    out_shard_size: str = out_shard_size_option()  # bytes (an int) once built


def share_sizes(share: str) -> list[int]:
    """The group sizes a fold's ``share`` option writes: one size, or a comma list of sizes (each >= 1)."""
    text = str(share).strip()
    try:
        sizes = [int(s) for s in text.split(",")]
    except ValueError:
        raise OptionError("share", f"{text!r} must be a group size or a comma list of sizes, e.g. 2 or 1,2,2") from None
    if any(s < 1 for s in sizes):
        raise OptionError("share", f"{text!r}: group sizes must be >= 1")
    return sizes


class FoldOptions(Options):
    """``weightsmith fold``: remove blocks, share weights within groups of kept blocks, heal."""
    data: Path = option(path=True, help="Calibration text for gates, similarity and heal.")
    remove: float = option(0.25, lo=0, hi=1, hi_open=True, help="Fraction of blocks to remove.")
    share: str = option("1", help="Group size for weight sharing among kept blocks, or a comma list of sizes "
                                  "(1 = no sharing).")
    share_init: str = option("best", choices=SHARE_INITS, help="Shared weights start from the member whose weights "
                             "cost least calibration loss, measured (best), or the group's average, first or middle "
                             "block.")
    importance: str = option("loss", choices=FOLD_IMPORTANCE, help="loss (calibration loss measured with blocks "
                             "taken out), gates (FoldGPT hard-concrete gates), bi (ShortGPT Block Influence) or "
                             "angular (min angular-distance span).")
    gate_steps: int = option(200, lo=1, help="Training steps for the gates.")
    relax_rank: int = option(0, lo=0, help="Per-block low-rank residual (SVD of original - shared) of this rank; "
                                           "0 = off.")
    heal_steps: int = option(0, lo=0, help="Heal fine-tune steps with tail-layer distillation; 0 = no heal.")
    heal_lr: float = option(3e-4, lo=0, lo_open=True, help="Heal learning rate.")
    heal_tail: int = option(2, lo=1, help="Last hidden states matched to the original's in the heal.")
    heal_pooled_weight: float = option(1.0, lo=0, help="Encoders: weight of the pooled sentence embedding's cosine "
                                                      "distance in the heal loss (the hidden states' MSE weighs 1).")
    heal_splice: float = option(0.0, lo=0, hi=1, help="Encoders: share of each heal batch replaced by new inputs, "
                                                     "the start of one calibration sentence joined to the end of "
                                                     "another.")
    heal_lora: int = option(0, lo=0, help="Heal with peft LoRA adapters of this rank on the blocks' linear layers "
                                          "(merged back after; layers sharing a weight share an adapter); 0 = "
                                          "fine-tune the blocks' weights.")
    heal_optimizer: str = option("adamw", choices=HEAL_OPTIMIZERS, help="adamw (two moments per trained weight) "
                                 "or adafactor (torch's: a factored second moment and no first, next to no state; "
                                 "a full heal in less memory).")
    heal_recompute: bool = option(False, help="Keep only each block's input for the heal's backward pass and "
                                              "recompute the rest there (activation checkpointing): the same "
                                              "steps in less memory, one more forward pass per step.")
    teacher_cache: bool = option(False, help="Compute the original's outputs on the heal windows once, into a "
                                             "memory-mapped temporary file, so that each heal step runs only the "
                                             "folded model (and a full heal trains the original's tensors in place).")
    dtype: str | None = option(None, choices=DTYPES, help="Fold (and write) in float32, bfloat16 or float16 "
                                                          "(default: as stored).")
    fsdp: bool = option(False, help="Across the processes of torchrun or accelerate launch, shard the heal's "
                                    "weights, gradients and optimizer states (FSDP) instead of replicating the "
                                    "model on every rank; accelerate launch --use_fsdp asks for it too.")
    seq_len: int | None = seq_len_option(None, help="Tokens per calibration window (default: min(positions, "
                                                       "128)).", aliases=("--seq",))
    max_tokens: int = max_tokens_option(16384, help="Calibration tokens for the importance (and the heal, unless "
                                                    "--heal-max-tokens).")
    heal_max_tokens: int | None = max_tokens_option(None, help="Calibration tokens the heal trains on (default: "
                                                               "--max-tokens).")
    batch_size: int = batch_size_option(8, help="Windows per step.")
    out_shard_size: str = out_shard_size_option()  # bytes (an int) once built

    def check(self) -> None:
        share_sizes(self.share)


class MergeOptions(Options):
    """``weightsmith merge`` and the pipeline's merge stage: how a recipe is run and written (the recipe itself
    says what is merged)."""
    dtype: str | None = option(None, choices=DTYPES, help="Output dtype float32/bfloat16/float16 (overrides the "
                               "recipe's out_dtype/dtype). [default: recipe out_dtype, else dtype, else as input]")
    out_shard_size: str = out_shard_size_option()  # bytes (an int) once built
    allow_crimes: bool = option(False, flag="--allow-crimes/--no-allow-crimes",
                                help="Merge models whose configs disagree on architecture.")
    copy_tokenizer: bool = option(True, help="Copy the tokenizer files to the output.")
    model_card: bool = option(True, flag="--write-model-card/--no-write-model-card",
                              help="Write README.md describing the merge.")
    allow_nonfinite: bool = option(False, help="Merge inputs holding NaN/inf (reported per tensor) instead of "
                                               "refusing them.")


class MergeStageOptions(MergeOptions):
    """A pipeline's merge stage: the run options above plus the recipe, given as params."""
    method: str = option(cli=False, help="Merge method, as a recipe's merge_method.")
    base_model: Path | None = option(None, path=True, cli=False, help="Base model folder.")
    parameters: dict | None = option(None, cli=False, help="Global parameters, as a recipe's parameters.")
    model_parameters: list[dict] | None = option(None, cli=False, help="One parameters mapping per input, in order.")

    def run_options(self) -> MergeOptions:
        return MergeOptions(**{n: getattr(self, n) for n in MergeOptions.specs()})


class ExportOptions(Options):
    """``weightsmith export``: a folded or RPS folder -> a plain checkpoint."""
    plain: bool = option(True, pipeline=False, help="Write an ordinary checkpoint (shared or hashed weights "
                                                    "materialised).")
    out_shard_size: str = out_shard_size_option()  # bytes (an int) once built


class MoeOptions(Options):
    """``weightsmith moe``: a Mixtral / Qwen2-MoE model from dense experts, as a mergekit-moe config describes it."""
    out_shard_size: str = out_shard_size_option()  # bytes (an int) once built
    copy_tokenizer: bool = option(True, help="Save the base's tokenizer (padded with BOS, as mergekit) to the output.")
    model_card: bool = option(True, flag="--write-model-card/--no-write-model-card",
                              help="Write README.md and the config beside the model.")
    allow_all_same: bool = option(False, flag="--i-understand-this-is-not-useful-without-training",
                                  help="Build even when every expert is the same model (for training afterwards).")
    hidden_dtype: str = option("bfloat16", choices=DTYPES, help="dtype the base runs in for hidden gates "
                                                                 "(bfloat16, as mergekit-moe).")
    explain: Path | None = option(None, path=True, pipeline=False, help="Instead of building: this MoE folder's "
                                  "routing of each prompt in the data (one prompt per line or record).")
    data: Path | None = option(None, path=True, pipeline=False, help="Prompts for the explanation (text, .jsonl with "
                                                                     "'text').")

    def check(self) -> None:
        if self.explain is not None and self.data is None:
            raise MissingOption("data", "an explanation routes prompts: give them by {0}", ("explain",))


class ExtractLoraOptions(Options):
    """``weightsmith extract-lora``: a fine-tune minus its base as a PEFT LoRA adapter (truncated SVD per layer)."""
    base: Path = option(path=True, aliases=("--base-model",), help="Base model the fine-tune started from (a folder, "
                                                                   "org/name[@revision] or model+adapter).")
    max_rank: int = option(128, lo=1, help="Largest rank of any layer's adapter.")
    rank: str = option("max", choices=LORA_RANKS, help="max: every layer at max_rank (as mergekit); auto: per layer "
                                                       "the smallest rank keeping the energy share of the delta's "
                                                       "spectrum (capped at max_rank).")
    energy: float = option(0.95, lo=0, hi=1, lo_open=True, help="Share of sum(s^2) kept per layer with rank auto.")
    sv_epsilon: float = option(0.0, lo=0, help="Drop singular values at or below this.")
    distribute_scale: bool = option(True, help="Split the singular values as sqrt(s) into A and B (else all in A).")
    embed_lora: bool = option(False, flag="--embed-lora/--no-embed-lora",
                              help="Decompose embeddings too (else they are saved at full rank).")
    save_module: list[str] | None = option(None, help="Module name (or last name part) saved at full rank; "
                                                      "repeatable.")
    include_regex: list[str] | None = option(None, short="-i", help="Only modules matching one of these regexes; "
                                                                    "repeatable.")
    exclude_regex: list[str] | None = option(None, short="-e", help="Skip modules matching one of these regexes; "
                                                                    "repeatable.")
    skip_undecomposable: bool = option(False, help="Skip modules that are not linear/embedding (norms) instead of "
                                                   "saving them at full rank.")
    svd: str = option("auto", choices=LORA_SVD, help="exact (torch.linalg.svd, as mergekit), lowrank (randomized, "
                                                     "torch.svd_lowrank) or auto: lowrank where the kept rank is small "
                                                     "next to the matrix and the spectrum falls off after it, exact "
                                                     "otherwise.")
    data: Path | None = option(None, path=True, help="Held-out text: report perplexity of base, base + adapter and "
                                                     "fine-tune.")
    max_tokens: int | None = max_tokens_option(None, help="Use at most this many tokens of the data.")
    tokenizer: Path | None = option(None, path=True, help="Tokenizer folder for the data (default: the fine-tune's).")


STAGE_OPTIONS: dict[str, type[Options]] = {"eval": EvalOptions, "analyze": AnalyzeOptions, "compress": RpsOptions,
                                           "align": AlignOptions, "pleas": PleasOptions, "export": ExportOptions,
                                           "fold": FoldOptions, "merge": MergeStageOptions,
                                           "extract-lora": ExtractLoraOptions, "moe": MoeOptions}
