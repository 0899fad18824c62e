"""One Spark session per process, configured from the run config.

Embedded runs use ``local[*]``; on a cluster the config names a ``k8s://`` master and
the executor image. Only the session is shared: each stage function takes it as an
argument so the driver can reuse one session for a whole run.
"""
from __future__ import annotations

import os

from gdmix.config import Config


def session(cfg: Config | None = None, app: str = "gdmix"):
    os.environ.setdefault("SPARK_LOCAL_IP", "127.0.0.1")
    os.environ.setdefault("PYSPARK_PYTHON", os.environ.get("PYSPARK_PYTHON") or __import__("sys").executable)
    from pyspark.sql import SparkSession

    master = cfg.spark.master if cfg else "local[*]"
    # Embedded: few shuffle partitions (adaptive execution coalesces small ones further);
    # on a cluster, Spark's default 200, coalesced the same way.
    shuffle_partitions = "8" if master.startswith("local") else "200"
    b = (SparkSession.builder.appName(app).master(master)
         .config("spark.driver.memory", cfg.spark.driver_memory if cfg else "4g")
         .config("spark.sql.shuffle.partitions", shuffle_partitions)
         .config("spark.ui.enabled", "false")
         .config("spark.ui.showConsoleProgress", "false")
         .config("spark.sql.session.timeZone", "UTC")
         .config("spark.sql.parquet.outputTimestampType", "TIMESTAMP_MICROS")
         # The prepare stage's generated code for a wide bag is one huge method, which
         # HotSpot by default never JIT-compiles (8 kB bytecode limit): 5x slower writes.
         .config("spark.driver.extraJavaOptions", "-Dlog4j2.level=WARN -XX:-DontCompileHugeMethods")
         .config("spark.sql.adaptive.enabled", "true"))
    for k, v in (cfg.spark.conf if cfg else {}).items():
        b = b.config(k, v)
    spark = b.getOrCreate()
    spark.sparkContext.setLogLevel("ERROR")
    return spark


def path(url: str) -> str:
    """A path Spark reads the same way fsspec does (local paths made absolute)."""
    from gdmix.io import absolute, is_local

    return absolute(url) if is_local(url) else url
