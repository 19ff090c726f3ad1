"""weightsmith: compress and merge Hugging Face transformer checkpoints, stage by stage."""
from .startup import without_collections as _without_collections

with _without_collections():
    from .errors import WeightsmithError
    from .loading import load

__version__ = "0.1.0"
__all__ = ["WeightsmithError", "load", "__version__"]
