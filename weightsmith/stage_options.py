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

    def check(self) -> None:
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
    out_shard_size: str = out_shard_size_option()

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
    out_shard_size: str = out_shard_size_option()


class ExportOptions(Options):
    """``weightsmith export``: a folded or RPS folder -> a plain checkpoint."""
    plain: bool = option(True, pipeline=False, help="Write an ordinary checkpoint (shared or hashed weights "
                                                    "materialised).")
    out_shard_size: str = out_shard_size_option()


STAGE_OPTIONS: dict[str, type[Options]] = {"eval": EvalOptions, "analyze": AnalyzeOptions, "compress": RpsOptions,
                                           "align": AlignOptions, "pleas": PleasOptions, "export": ExportOptions}
