"""weightsmith: compress and merge Hugging Face transformer checkpoints, stage by stage."""
import gc as _gc

# Importing torch creates about a million objects; a garbage collection every few thousand of them finds
# nothing to free and costs a tenth of the start-up. Collection resumes once the imports are done.
_collecting = _gc.isenabled()
_gc.disable()
try:
    from .errors import WeightsmithError
    from .loading import load
finally:
    if _collecting:
        _gc.enable()

__version__ = "0.1.0"
__all__ = ["WeightsmithError", "load", "__version__"]
