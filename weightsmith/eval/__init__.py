"""Evaluation: perplexity, accuracy, size and speed, side by side."""
from ..data import load_labelled, load_texts
from .metrics import EvalRow, accuracy, count_params, folder_size, perplexity, tokenize, windows
from .processors import load_tokenizer
from .run import evaluate, evaluate_model

__all__ = ["EvalRow", "accuracy", "count_params", "evaluate", "evaluate_model", "folder_size", "load_labelled",
           "load_texts", "load_tokenizer", "perplexity", "tokenize", "windows"]
