"""The driver side: config, CLI, supervision, per-rank loop, metrics, storage."""
from orchestrator.config import ConfigError, JobSpec, load_spec
from orchestrator.driver import RunFailed, RunResult, run
from orchestrator.compare import CompareResult, compare, summarize

__all__ = ["CompareResult", "ConfigError", "JobSpec", "RunFailed", "RunResult", "compare", "load_spec", "run",
           "summarize"]
