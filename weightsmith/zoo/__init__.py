"""A small, deterministic, cached zoo of real models trained on text that ships with Python."""
from .build import SIZES, Zoo, build, cache_root, minilm_path, zoo_path

__all__ = ["SIZES", "Zoo", "build", "cache_root", "minilm_path", "zoo_path"]
