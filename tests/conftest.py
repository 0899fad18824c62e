import logging
import os

import pytest

os.environ.setdefault("SPARK_LOCAL_IP", "127.0.0.1")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
# py4j logs each connection it closes at INFO, some at interpreter exit, after pytest has
# closed the streams its log capture writes to ("--- Logging error ---").
logging.getLogger("py4j").setLevel(logging.WARNING)


@pytest.fixture(scope="session")
def spark():
    """One real local Spark session for the whole test run (start-up costs 6-17 s); the
    tests' inputs are all small, so it JIT-compiles as an embedded run on them does."""
    from gdmix import spark as gspark

    s = gspark.session(app="gdmix-tests", small_input=True)
    yield s
    s.stop()
