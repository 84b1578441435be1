import os

import pytest

# Generated data goes to a per-session cache, so tests never depend on ~/.cache.
os.environ.setdefault("POLYTRAIN_DATA", os.path.join(os.environ.get("TMPDIR", "/tmp"), f"polytrain-test-data-{os.getuid()}"))


@pytest.fixture
def small_gpt() -> dict:
    """A gpt-tiny shape small enough for fast multi-rank tests."""
    return {"name": "gpt-tiny", "n_layers": 2, "d_model": 64, "seq_len": 64}


SLOWEST_FIRST = ("e2e", "distributed", "unit")  # the two test processes take whole files in this order


def pytest_collection_modifyitems(items):
    """The suite's own checks (undeclared dependencies) run first: a fresh machine
    missing a package fails in a second, by name, not after minutes of tests. Then
    the slow folders, so the quick unit files fill the gaps at the end instead of
    one long e2e file running alone."""
    def key(item):
        folder = item.path.parent.name
        return item.path.name != "test_dependencies.py", SLOWEST_FIRST.index(folder) if folder in SLOWEST_FIRST else 3

    items.sort(key=key)
