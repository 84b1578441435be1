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


_PEER_FAILURE = ("connection closed by peer", "connection reset", "broken pipe", "remote worker crashing",
                 "gloo", "nccl", "timed out", "socket")


def is_echo(msg: str) -> bool:
    """An error that is the echo of another rank's death or hang (a collective that lost its peer).
    Here, not in the controller, so that a worker needs neither the controller nor pandas."""
    return any(p in msg.lower() for p in _PEER_FAILURE)
