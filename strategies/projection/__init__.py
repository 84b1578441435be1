"""Projection: a strategy's predicted step on a cluster this machine does not have (see docs/projection.md)."""
from strategies.projection.layout import Skip, job_for
from strategies.projection.model import Job, Prediction, Profile, Target, predict

__all__ = ["Job", "Prediction", "Profile", "Skip", "Target", "job_for", "predict"]
