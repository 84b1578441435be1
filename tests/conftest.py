import os

import pytest

# Generated data goes to a per-session cache, so tests never depend on ~/.cache.
os.environ.setdefault("POLYTRAIN_DATA", os.path.join(os.environ.get("TMPDIR", "/tmp"), f"polytrain-test-data-{os.getuid()}"))


@pytest.fixture
def small_gpt() -> dict:
    """A gpt-tiny shape small enough for fast multi-rank tests."""
    return {"name": "gpt-tiny", "n_layers": 2, "d_model": 64, "seq_len": 64}


def pytest_collection_modifyitems(items):
    """The suite's own checks (undeclared dependencies) run first: a fresh machine
    missing a package fails in a second, by name, not after minutes of tests."""
    items.sort(key=lambda item: item.path.name != "test_dependencies.py")
