"""One Spark session per process, configured from the run config.

Embedded runs use ``local[*]``; on a cluster the config names a ``k8s://`` master and
the executor image. A ``spark.driver.extraJavaOptions`` in the config's ``spark.conf``
replaces the JVM options chosen here. Only the session is shared: each stage function
takes it as an argument so the driver can reuse one session for a whole run.
"""
from __future__ import annotations

import os

from gdmix import spark_cds, storage
from gdmix.config import Config


# Embedded runs on inputs under this size JIT-compile Spark with C1 only. A short-lived
# local JVM otherwise spends most of its CPU in the C2 compiler on code it then runs for
# seconds. End to end on 2 cores, tiered (C2) vs C1 only: MovieLens-100K (1.7 MB) 63-66 s
# vs 48-54 s; synthetic 100k rows (14 MB) 66.3 vs 65.0 s; 300k rows (39 MB) 87.7 vs
# 96.0 s; 1M rows (126 MB) 134 vs 193 s (benchmarks/RESULTS.md).
C1_ONLY_MAX_INPUT_BYTES = 8 * 2**20
DRIVER_JAVA_OPTIONS = "-Dlog4j2.level=WARN -XX:-DontCompileHugeMethods"


def input_bytes(cfg: Config) -> int:
    return sum(storage.size_bytes(u) for u in (cfg.data.train, cfg.data.validation) if u)


def small_embedded_input(cfg: Config | None) -> bool:
    """An embedded (local master) run on an input under ``C1_ONLY_MAX_INPUT_BYTES``."""
    return (cfg is not None and cfg.spark.master.startswith("local")
            and input_bytes(cfg) < C1_ONLY_MAX_INPUT_BYTES)


def driver_java_options(cfg: Config | None, small_input: bool | None = None) -> str:
    """The driver JVM's options: ``DRIVER_JAVA_OPTIONS``, plus C1-only JIT for a small
    embedded input (``small_embedded_input``; ``small_input`` decides instead when given),
    plus the class-data-sharing archive when one was built (``gdmix.spark_cds``)."""
    if small_input is None:
        small_input = small_embedded_input(cfg)
    opts = [DRIVER_JAVA_OPTIONS, "-XX:TieredStopAtLevel=1" if small_input else "", spark_cds.java_option()]
    return " ".join(o for o in opts if o)


def session(cfg: Config | None = None, app: str = "gdmix", small_input: bool | None = None):
    """The session for ``cfg`` (defaults without one); ``small_input`` overrides the JIT
    choice of ``driver_java_options``."""
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
         .config("spark.driver.extraJavaOptions", driver_java_options(cfg, small_input))
         .config("spark.sql.adaptive.enabled", "true"))
    for k, v in (cfg.spark.conf if cfg else {}).items():
        b = b.config(k, v)
    spark = b.getOrCreate()
    spark.sparkContext.setLogLevel("ERROR")
    return spark


def path(url: str) -> str:
    """A path Spark reads the same way fsspec does (local paths made absolute)."""
    return storage.absolute(url) if storage.is_local(url) else url
