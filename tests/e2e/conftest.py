import logging

import pytest


@pytest.fixture(scope="session")
def ray_address():
    """One Ray instance for the whole session; jobs join it instead of starting their own."""
    import ray
    ctx = ray.init(num_cpus=4, include_dashboard=False, logging_level=logging.ERROR, log_to_driver=False)
    yield ctx.address_info["gcs_address"]
    ray.shutdown()
