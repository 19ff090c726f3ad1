"""``weightsmith run``: a YAML pipeline wires stage functions (inspect, eval, merge, fold, ...) over model folders.

The YAML only names stages, their inputs and their parameters (torchtune-style recipes); each stage is
one small adapter in ``weightsmith.pipeline.stages`` that calls the stage's library function.
"""
from .runner import run_pipeline
from .spec import Pipeline, StageEntry, load_pipeline
from .stages import STAGES, Context, StageDef

__all__ = ["Context", "Pipeline", "STAGES", "StageDef", "StageEntry", "load_pipeline", "run_pipeline"]
