"""Depth compression: layer-similarity analysis and FoldGPT folding (gates, group sharing, heal)."""
from .analyze import analyze
from .stage import fold

__all__ = ["analyze", "fold"]
