import os

import pytest

os.environ.setdefault("SPARK_LOCAL_IP", "127.0.0.1")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")


@pytest.fixture(scope="session")
def spark():
    """One real local Spark session for the whole test run (start-up costs 6-17 s)."""
    from gdmix import spark as gspark

    s = gspark.session(app="gdmix-tests")
    yield s
    s.stop()
