"""Moved: the pipeline strategy is ``strategies.pipeline.strategy``, its part ``strategies.pipeline.part``."""
from strategies.pipeline.strategy import Pipeline, PipelineOptions, check_layout  # noqa: F401
