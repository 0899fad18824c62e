"""The child process of ``gdmix.spark_cds.build``: the Spark stages on a tiny synthetic
problem, in a driver JVM that writes the classes it loaded into an archive as it exits.

    python -m gdmix.cds_recorder ARCHIVE
"""
from __future__ import annotations

import os
import sys
import tempfile

from gdmix import config, plan, stages
from gdmix import spark as gspark
from gdmix.data import synthetic
from gdmix.spark_cds import BUILD_TIMEOUT_SECONDS


def record(archive: str) -> None:
    """In the child: the Spark stages on a tiny synthetic problem, in a JVM that writes
    the classes it loaded into ``archive`` when this process exits."""
    with tempfile.TemporaryDirectory(prefix="gdmix-cds-") as tmp:
        spark = None
        for ntv in (False, True):  # plain feature columns, and name-term-value bags (Arrow UDF)
            data = os.path.join(tmp, f"data-{ntv}")
            info = synthetic.generate(data, n_rows=3000, n_users=40, n_items=20, ntv=ntv, weight=True)
            cfg = config.parse({
                "name": "cds", "workdir": os.path.join(tmp, f"run-{ntv}"),
                "data": {"train": info["train"], "feature_bags": info["bags"], "validation_fraction": 0.2},
                "iterations": 1,
                "coordinates": [{"name": "per_user", "type": "random_effect", "entity": "user_id",
                                 "feature_bag": "per_user", "l2": 1.0}],
                "spark": {"conf": {"spark.driver.extraJavaOptions":
                                   f"{gspark.driver_java_options(None, True)} -XX:ArchiveClassesAtExit={archive}"}},
            })
            config.snapshot(cfg)
            spark = spark or gspark.session(cfg, app="gdmix-cds")
            step = plan.steps(cfg)[0]
            stages.prepare(cfg, cfg.workdir, spark)
            stages.partition(cfg, cfg.workdir, step, spark)
            stages.train(cfg, cfg.workdir, step)
            stages.metrics(cfg, cfg.workdir, step, spark)
        spark.stop()
    # The JVM writes the archive as it exits, after this process would: end it and wait.
    from pyspark import SparkContext

    proc = getattr(SparkContext._gateway, "proc", None)
    if proc is not None:
        proc.stdin.close()  # the gateway JVM exits when its stdin closes
        proc.wait(timeout=BUILD_TIMEOUT_SECONDS)



if __name__ == "__main__":
    record(sys.argv[1])
