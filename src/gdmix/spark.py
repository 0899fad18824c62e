"""One Spark session per process, configured from the run config.

Embedded runs use ``local[*]``. A cluster master runs the same stages unchanged, the
driver in this process (client mode): ``spark://host:port`` (a standalone cluster) or
``k8s://https://...`` from a pipeline step's pod, with executor pods from the Spark image
(``cluster_conf``). Any setting in the config's ``spark.conf`` replaces the one chosen
here (a ``spark.driver.extraJavaOptions`` there replaces the JVM options). Only the
session is shared: each stage function takes it as an argument so the driver can reuse
one session for a whole run.
"""
from __future__ import annotations

import os
from pathlib import Path

from gdmix import spark_cds, storage
from gdmix.config import Config


# Embedded runs on inputs under this size JIT-compile Spark with C1 only. A short-lived
# local JVM otherwise spends most of its CPU in the C2 compiler on code it then runs for
# seconds. End to end on 2 cores, tiered (C2) vs C1 only: MovieLens-100K (1.7 MB) 63-66 s
# vs 48-54 s; synthetic 100k rows (14 MB) 66.3 vs 65.0 s; 300k rows (39 MB) 87.7 vs
# 96.0 s; 1M rows (126 MB) 134 vs 193 s (benchmarks/RESULTS.md).
C1_ONLY_MAX_INPUT_BYTES = 8 * 2**20
# Spark's logging: warnings and errors, less the one that every start on a machine without
# Hadoop's native library prints (NativeCodeLoader: "Unable to load native-hadoop library").
LOG4J2_PROPERTIES = Path(__file__).with_name("log4j2.properties")
DRIVER_JAVA_OPTIONS = f"-Dlog4j2.configurationFile={LOG4J2_PROPERTIES} -XX:-DontCompileHugeMethods"
# Executors on a cluster run the generated code the driver's flag is for (prepare's wide
# bags); the driver's class-data-sharing archive is not theirs (another JVM, class path).
EXECUTOR_JAVA_OPTIONS = "-Dlog4j2.level=WARN -XX:-DontCompileHugeMethods"

# The step pod's address and name, from the downward API (status.podIP, metadata.name).
POD_IP_ENV = ("GDMIX_POD_IP", "POD_IP")
POD_NAME_ENV = ("GDMIX_POD_NAME", "POD_NAME")
IMAGE_ENV = "GDMIX_SPARK_IMAGE"  # the executors' image: the Spark image the step runs
EXECUTOR_TEMPLATE_ENV = "GDMIX_SPARK_EXECUTOR_TEMPLATE"
EXECUTOR_TEMPLATE = Path("manifests", "spark", "executor-pod-template.yaml")
EXECUTOR_TEMPLATE_DIRS = (Path(__file__).resolve().parents[2], Path("/opt/gdmix"))  # the repo, the images
EXECUTOR_CONTAINER = "executor"  # the template's container Spark fills in
SA_NAMESPACE_FILE = "/var/run/secrets/kubernetes.io/serviceaccount/namespace"
# Fixed driver ports, so a NetworkPolicy can admit executors to them.
DRIVER_PORT, DRIVER_BLOCK_MANAGER_PORT = "7078", "7079"


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
    # C1 only: a JVM without tiered compilation reserves 48 MB of code cache instead of 240 MB,
    # which a long-lived session (a test run, a notebook) fills: keep the tiered default.
    c1_only = "-XX:TieredStopAtLevel=1 -XX:ReservedCodeCacheSize=240m" if small_input else ""
    opts = [DRIVER_JAVA_OPTIONS, c1_only, spark_cds.java_option()]
    return " ".join(o for o in opts if o)


def _first(env, names) -> str:
    return next((env[n] for n in names if env.get(n)), "")


def executor_pod_template(env=None) -> str:
    """The executor pod template file: ``GDMIX_SPARK_EXECUTOR_TEMPLATE``, else
    ``manifests/spark/executor-pod-template.yaml`` in the repository or under /opt/gdmix."""
    env = os.environ if env is None else env
    named = env.get(EXECUTOR_TEMPLATE_ENV)
    candidates = [Path(named)] if named else [d / EXECUTOR_TEMPLATE for d in EXECUTOR_TEMPLATE_DIRS]
    for c in candidates:
        if c.is_file():
            return str(c)
    raise RuntimeError(f"no Spark executor pod template at {' or '.join(map(str, candidates))}: "
                       f"set {EXECUTOR_TEMPLATE_ENV} or put {EXECUTOR_TEMPLATE} into the Spark image")


def _in_namespace(template: str, namespace: str) -> str:
    """The template file for executors in ``namespace``: itself, or a copy with its
    ``metadata.namespace`` replaced (the API refuses a pod naming another namespace than
    the one it is created in; the file names the namespace ``manifests/`` deploy into)."""
    import tempfile

    import yaml

    with open(template) as f:
        pod = yaml.safe_load(f)
    meta = pod.setdefault("metadata", {})
    if meta.get("namespace") in (None, namespace):
        return template
    if namespace:
        meta["namespace"] = namespace
    else:
        del meta["namespace"]
    fd, path = tempfile.mkstemp(prefix="gdmix-executor-pod-", suffix=".yaml")
    with os.fdopen(fd, "w") as f:
        yaml.safe_dump(pod, f, sort_keys=False)
    return path


def _pod_namespace() -> str:
    try:
        with open(SA_NAMESPACE_FILE) as f:
            return f.read().strip()
    except OSError:
        return ""


def cluster_conf(cfg: Config, env=None) -> dict[str, str]:
    """Spark settings for a cluster master (none for a local one), the driver in this
    process: executor count and size from the config; the driver reachable at the pod's
    IP when one is known (``GDMIX_POD_IP``/``POD_IP``, required for ``k8s://``), bound on
    every interface; for ``k8s://`` executor pods from ``GDMIX_SPARK_IMAGE`` made from the
    executor pod template (which mounts the work volume), in the pod's namespace, owned
    by the step's pod (``GDMIX_POD_NAME``/``POD_NAME``) so they go when it goes."""
    env = os.environ if env is None else env
    sp = cfg.spark
    if sp.master.startswith("local"):
        return {}
    conf = {
        "spark.submit.deployMode": "client",
        "spark.executor.cores": str(sp.executor_cores),
        "spark.executor.memory": sp.executor_memory,
        "spark.executor.extraJavaOptions": EXECUTOR_JAVA_OPTIONS,
    }
    if sp.executors:
        conf["spark.executor.instances"] = str(sp.executors)
        conf["spark.cores.max"] = str(sp.executors * sp.executor_cores)  # standalone's count
    pod_ip = _first(env, POD_IP_ENV)
    if pod_ip:
        conf["spark.driver.host"] = pod_ip
        conf["spark.driver.bindAddress"] = "0.0.0.0"
    if not sp.master.startswith("k8s://"):
        return conf
    if not pod_ip and "spark.driver.host" not in sp.conf:
        raise RuntimeError(f"spark.master {sp.master}: the driver's pod IP is unknown (set {POD_IP_ENV[0]} "
                           "from the downward API's status.podIP): executors could not reach the driver")
    image = sp.conf.get("spark.kubernetes.container.image") or env.get(IMAGE_ENV)
    if not image:
        raise RuntimeError(f"spark.master {sp.master}: no executor image ({IMAGE_ENV}, or "
                           "spark.kubernetes.container.image in spark.conf)")
    conf.update({
        "spark.driver.port": DRIVER_PORT,
        "spark.driver.blockManager.port": DRIVER_BLOCK_MANAGER_PORT,
        "spark.kubernetes.container.image": image,
        "spark.kubernetes.executor.podTemplateContainerName": EXECUTOR_CONTAINER,
    })
    namespace = sp.conf.get("spark.kubernetes.namespace") or env.get("GDMIX_NAMESPACE") or _pod_namespace()
    if namespace:
        conf["spark.kubernetes.namespace"] = namespace
    if "spark.kubernetes.executor.podTemplateFile" not in sp.conf:  # else the config's own
        conf["spark.kubernetes.executor.podTemplateFile"] = _in_namespace(executor_pod_template(env), namespace)
    pod_name = _first(env, POD_NAME_ENV)
    if pod_name:
        conf["spark.kubernetes.driver.pod.name"] = pod_name
    return conf


def session(cfg: Config | None = None, app: str = "gdmix", small_input: bool | None = None):
    """The session for ``cfg`` (defaults without one); ``small_input`` overrides the JIT
    choice of ``driver_java_options``."""
    master = cfg.spark.master if cfg else "local[*]"
    if master.startswith("local"):
        os.environ.setdefault("SPARK_LOCAL_IP", "127.0.0.1")
    os.environ.setdefault("PYSPARK_PYTHON", os.environ.get("PYSPARK_PYTHON") or __import__("sys").executable)
    from pyspark.sql import SparkSession

    # Embedded: few shuffle partitions (adaptive execution coalesces small ones further);
    # on a cluster, Spark's default 200, coalesced the same way.
    shuffle_partitions = "8" if master.startswith("local") else "200"
    opts = {
        "spark.master": master,
        "spark.app.name": app,
        "spark.driver.memory": cfg.spark.driver_memory if cfg else "4g",
        "spark.sql.shuffle.partitions": shuffle_partitions,
        "spark.ui.enabled": "false",
        "spark.ui.showConsoleProgress": "false",  # the run's own progress line shows it (gdmix.console)
        "spark.sql.session.timeZone": "UTC",
        "spark.sql.parquet.outputTimestampType": "TIMESTAMP_MICROS",
        # The prepare stage's generated code for a wide bag is one huge method, which
        # HotSpot by default never JIT-compiles (8 kB bytecode limit): 5x slower writes.
        "spark.driver.extraJavaOptions": driver_java_options(cfg, small_input),
        "spark.sql.adaptive.enabled": "true",
        **(cluster_conf(cfg) if cfg else {}), **(cfg.spark.conf if cfg else {}),
    }
    _launch_gateway(opts)
    b = SparkSession.builder
    for k, v in opts.items():
        b = b.config(k, v)
    spark = b.getOrCreate()
    spark.sparkContext.setLogLevel("ERROR")
    return spark


# The JVM prints this line as it starts, for the incubator module Spark's launcher always
# adds (``--add-modules=jdk.incubator.vector``, org.apache.spark.launcher.JavaModuleOptions);
# the JVM has no switch to silence it, so the driver JVM's stderr passes through a filter
# that drops exactly these lines and forwards everything else unchanged.
JVM_NOISE = (b"WARNING: Using incubator modules: jdk.incubator.vector",)


def _launch_gateway(opts: dict[str, str]) -> None:
    """Start the driver JVM (pyspark's gateway) with ``opts``, its stderr through
    ``_forward_stderr``; nothing when a gateway exists already (this process started one,
    or a parent gave it one: ``PYSPARK_GATEWAY_PORT``)."""
    import subprocess
    import threading

    from pyspark import SparkConf, SparkContext
    from pyspark.java_gateway import launch_gateway

    with SparkContext._lock:
        if SparkContext._gateway is not None or "PYSPARK_GATEWAY_PORT" in os.environ:
            return
        conf = SparkConf(loadDefaults=False).setAll(list(opts.items()))
        gateway = launch_gateway(conf, popen_kwargs={"stderr": subprocess.PIPE})
        threading.Thread(target=_forward_stderr, args=(gateway.proc.stderr,), name="gdmix-jvm-stderr",
                         daemon=True).start()
        SparkContext._ensure_initialized(gateway=gateway)


def _forward_stderr(pipe) -> None:
    """Copy the JVM's stderr to this process's, line by line, less ``JVM_NOISE``."""
    for raw in iter(pipe.readline, b""):
        if raw.rstrip(b"\r\n") not in JVM_NOISE:
            os.write(2, raw)
    pipe.close()


def path(url: str) -> str:
    """A path Spark reads the same way fsspec does (local paths made absolute)."""
    return storage.absolute(url) if storage.is_local(url) else url
