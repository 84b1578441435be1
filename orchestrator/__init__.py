"""The driver side: config, CLI, supervision, per-rank loop, metrics, storage."""
import importlib
import sys
import types

from orchestrator.errors import ConfigError, RunFailed

__all__ = ["CompareResult", "ConfigError", "JobSpec", "RunFailed", "RunResult", "compare", "load_spec", "run",
           "summarize"]

# Loaded on first use (PEP 562), so that `polytrain` answers bad input without importing Ray or torch.
_LAZY = {"JobSpec": "orchestrator.config", "load_spec": "orchestrator.config", "RunResult": "orchestrator.driver",
         "run": "orchestrator.driver", "CompareResult": "orchestrator.compare", "compare": "orchestrator.compare",
         "summarize": "orchestrator.metrics"}


def __getattr__(name: str):
    if name in _LAZY:
        value = getattr(importlib.import_module(_LAZY[name]), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'orchestrator' has no attribute {name!r}")


class _Package(types.ModuleType):
    def __setattr__(self, name, value):
        # Importing the submodule orchestrator.compare binds it here as `compare`, over the
        # compare() function this package exports: keep the function, as an eager import did.
        if name == "compare" and isinstance(value, types.ModuleType):
            value = value.compare
        super().__setattr__(name, value)


sys.modules[__name__].__class__ = _Package
