"""polytrain's error types, in a module that imports nothing: the CLI answers
bad input with them before torch, Ray or any registry is imported."""


class ConfigError(ValueError):
    """Invalid job input: reported on one line, exit code 2, before any worker starts."""


class RunFailed(RuntimeError):
    """The job started but did not finish (exit code 1)."""


class CheckpointError(ValueError):
    """A checkpoint that cannot be loaded; the message names the file and the reason."""


class SnapshotLost(RuntimeError):
    """The in-memory snapshot to restore cannot be fetched (its Keeper or object
    is gone): the controller falls back to the newest committed checkpoint."""
