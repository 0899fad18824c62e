"""The embedded driver's background metrics: failures and timeouts reach the run, and a
timed-out metrics stage leaves no Spark job or thread running."""
import threading
import time

import pytest

from gdmix import driver


def _metrics_threads():
    return [t for t in threading.enumerate() if t.name.startswith("gdmix-metrics")]


def test_a_failed_metrics_stage_is_raised_at_the_next_check(spark):
    bg = driver.BackgroundMetrics(spark, timeout_s=60)
    try:
        bg.submit("iter-0/a", lambda: spark.range(5).count())
        bg.submit("iter-0/b", lambda: (_ for _ in ()).throw(ValueError("bad scores")))
        deadline = time.monotonic() + 60
        while not all(f.done() for _, f in bg.futures) and time.monotonic() < deadline:
            time.sleep(0.05)
        with pytest.raises(ValueError, match="bad scores"):
            bg.check()
    finally:
        bg.close()


def test_a_metrics_stage_past_its_timeout_is_cancelled_with_its_spark_job(spark):
    bg = driver.BackgroundMetrics(spark, timeout_s=1.0)
    started = threading.Event()

    def endless():
        started.set()
        return spark.range(10**13).selectExpr("sum(id % 7)").first()  # hours of work

    bg.submit("iter-0/global", endless)
    assert started.wait(30)
    t0 = time.monotonic()
    with pytest.raises(TimeoutError, match=r"iter-0/global metrics did not finish within 1 s"):
        bg.drain()
    assert time.monotonic() - t0 < 10
    deadline = time.monotonic() + 60  # the cancelled job fails its thread, which then ends
    while _metrics_threads() and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not _metrics_threads()
    assert spark.range(3).count() == 3  # the session is still usable
