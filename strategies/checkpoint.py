"""Moved: a strategy's DCP state is ``strategies.dcp`` (the run's checkpoints are ``orchestrator.checkpoint``)."""
from strategies.dcp import (  # noqa: F401
    full_param_groups, held_bytes, is_local, load_state, read_metadata, save_state,
)
