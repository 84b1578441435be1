"""Moved: per-rank DCP state is in ``strategies.dcp``."""
from strategies.dcp import load_per_rank, save_per_rank, saved_world  # noqa: F401
