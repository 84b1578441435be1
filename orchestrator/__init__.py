"""The driver side: config, CLI, supervision, per-rank loop, metrics, storage."""
from orchestrator.config import ConfigError, JobSpec, load_spec
from orchestrator.driver import RunFailed, RunResult, run

__all__ = ["ConfigError", "JobSpec", "RunFailed", "RunResult", "load_spec", "run"]
