"""Moved: pipeline stages save and load with ``strategies.dcp`` (``groups=full_param_groups(...)``)."""
from strategies.dcp import full_param_groups  # noqa: F401
