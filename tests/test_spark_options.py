"""The driver JVM's options: C1-only JIT for small embedded inputs, C2 otherwise; the
settings for a cluster master; the executor pod template."""
import copy
import subprocess
import sys
import zipfile
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import yaml

from gdmix import config
from gdmix import spark as gspark
from gdmix.kfp import tfjob
from helpers import raw_config

C1 = "-XX:TieredStopAtLevel=1"


def _cfg(tmp_path, **over):
    train = tmp_path / "train"
    train.mkdir(exist_ok=True)
    pq.write_table(pa.table({"x": list(range(5000))}), train / "part-0.parquet")
    return config.parse(raw_config(tmp_path / "work", train=train, **over))


def test_small_local_input_gets_c1_only_and_the_huge_method_flag(tmp_path):
    cfg = _cfg(tmp_path)
    assert 0 < gspark.input_bytes(cfg) < gspark.C1_ONLY_MAX_INPUT_BYTES
    opts = gspark.driver_java_options(cfg)
    assert C1 in opts and "-XX:-DontCompileHugeMethods" in opts


def test_large_or_cluster_input_keeps_the_tiered_jit(tmp_path, monkeypatch):
    cfg = _cfg(tmp_path)
    monkeypatch.setattr(gspark, "C1_ONLY_MAX_INPUT_BYTES", gspark.input_bytes(cfg))  # now "large"
    assert C1 not in gspark.driver_java_options(cfg)
    monkeypatch.undo()
    on_k8s = _cfg(tmp_path, spark={"master": "k8s://https://kubernetes.default.svc"})
    assert C1 not in gspark.driver_java_options(on_k8s)
    assert C1 not in gspark.driver_java_options(None)
    assert C1 in gspark.driver_java_options(None, small_input=True)


# --- a cluster master: k8s:// from a pipeline step (client mode), spark:// standalone ------

K8S = "k8s://https://kubernetes.default.svc"
POD_ENV = {"GDMIX_POD_IP": "10.4.2.7", "POD_NAME": "gdmix-run-x-prepare-1234", "GDMIX_NAMESPACE": "kubeflow",
           "GDMIX_SPARK_IMAGE": "registry.example/gdmix-spark:0.1.0"}


def test_k8s_master_conf_puts_the_driver_at_the_pod_ip_and_sizes_executors_from_the_config(tmp_path):
    cfg = _cfg(tmp_path, spark={"master": K8S, "executors": 4, "executor_cores": 2, "executor_memory": "6g"})
    conf = gspark.cluster_conf(cfg, POD_ENV)
    assert conf["spark.submit.deployMode"] == "client"
    assert conf["spark.driver.host"] == "10.4.2.7" and conf["spark.driver.bindAddress"] == "0.0.0.0"
    assert (conf["spark.executor.instances"], conf["spark.executor.cores"], conf["spark.executor.memory"]) == ("4", "2", "6g")
    assert conf["spark.kubernetes.container.image"] == "registry.example/gdmix-spark:0.1.0"
    assert conf["spark.kubernetes.namespace"] == "kubeflow"
    assert conf["spark.kubernetes.driver.pod.name"] == "gdmix-run-x-prepare-1234"  # executors owned by the step's pod
    assert Path(conf["spark.kubernetes.executor.podTemplateFile"]) == TEMPLATE  # already names kubeflow
    assert conf["spark.kubernetes.executor.podTemplateContainerName"] == _template()["spec"]["containers"][0]["name"]
    assert "-XX:-DontCompileHugeMethods" in conf["spark.executor.extraJavaOptions"]
    assert "SharedArchiveFile" not in conf["spark.executor.extraJavaOptions"]  # the driver's archive only
    # POD_IP (the other common name) works too; the GDMIX_ one wins
    assert gspark.cluster_conf(cfg, {**POD_ENV, "GDMIX_POD_IP": "", "POD_IP": "10.9.9.9"})["spark.driver.host"] == "10.9.9.9"


def test_k8s_executors_in_another_namespace_get_a_template_naming_it(tmp_path):
    cfg = _cfg(tmp_path, spark={"master": K8S})
    conf = gspark.cluster_conf(cfg, {**POD_ENV, "GDMIX_NAMESPACE": "team-a"})
    assert conf["spark.kubernetes.namespace"] == "team-a"
    copy_ = yaml.safe_load(Path(conf["spark.kubernetes.executor.podTemplateFile"]).read_text())
    assert copy_["metadata"]["namespace"] == "team-a"
    original = _template()
    original["metadata"]["namespace"] = "team-a"
    assert copy_ == original  # nothing else changed


def test_k8s_master_without_a_pod_ip_or_image_is_refused(tmp_path):
    cfg = _cfg(tmp_path, spark={"master": K8S})
    with pytest.raises(RuntimeError, match="status.podIP"):
        gspark.cluster_conf(cfg, {k: v for k, v in POD_ENV.items() if k != "GDMIX_POD_IP"})
    with pytest.raises(RuntimeError, match="GDMIX_SPARK_IMAGE"):
        gspark.cluster_conf(cfg, {k: v for k, v in POD_ENV.items() if k != "GDMIX_SPARK_IMAGE"})
    missing = {**POD_ENV, "GDMIX_SPARK_EXECUTOR_TEMPLATE": str(tmp_path / "missing.yaml")}
    with pytest.raises(RuntimeError, match="executor pod template"):
        gspark.cluster_conf(cfg, missing)
    # unless the config's spark.conf names the driver's address and its own template
    own = _cfg(tmp_path, spark={"master": K8S, "conf": {"spark.driver.host": "gdmix-driver.kubeflow.svc",
                                                        "spark.kubernetes.executor.podTemplateFile": "/etc/t.yaml"}})
    conf = gspark.cluster_conf(own, {k: v for k, v in missing.items() if k != "GDMIX_POD_IP"})
    assert "spark.kubernetes.executor.podTemplateFile" not in conf and "spark.driver.host" not in conf


def test_local_and_standalone_masters(tmp_path):
    assert gspark.cluster_conf(_cfg(tmp_path), POD_ENV) == {}  # local: nothing of a cluster's
    standalone = _cfg(tmp_path, spark={"master": "spark://10.0.0.1:7077", "executors": 3, "executor_cores": 2})
    conf = gspark.cluster_conf(standalone, {})
    assert conf["spark.cores.max"] == "6" and conf["spark.executor.instances"] == "3"
    assert "spark.driver.host" not in conf and not any(k.startswith("spark.kubernetes.") for k in conf)
    assert gspark.cluster_conf(standalone, {"POD_IP": "10.4.2.7"})["spark.driver.host"] == "10.4.2.7"


def test_executor_settings_survive_the_run_snapshot_and_are_checked(tmp_path):
    cfg = _cfg(tmp_path, spark={"master": K8S, "executors": 4, "executor_cores": 2, "executor_memory": "6g"})
    again = config.parse(config.to_raw(cfg))  # what every later stage reads (config.yaml)
    assert again.spark == cfg.spark and again.spark.executors == 4
    assert _cfg(tmp_path).spark.executors == 0  # the cluster manager's default count
    with pytest.raises(config.ConfigError, match=r"spark\.executor_cores"):
        _cfg(tmp_path, spark={"executor_cores": 0})
    with pytest.raises(config.ConfigError, match=r"spark\.executors"):
        _cfg(tmp_path, spark={"executors": -1})


# --- the executor pod template -------------------------------------------------------------

ROOT = Path(__file__).resolve().parents[1]
TEMPLATE = ROOT / "manifests" / "spark" / "executor-pod-template.yaml"


def _template():
    return yaml.safe_load(TEMPLATE.read_text())


def test_executor_pod_template_is_a_valid_pod_that_mounts_the_work_volume():
    kv = pytest.importorskip("kubernetes_validate")
    pod = _template()
    kv.validate(pod, "1.30", strict=True)
    (pvc,) = [d for d in yaml.safe_load_all((ROOT / "manifests" / "gdmix" / "pvc.yaml").read_text()) if d]
    (volume,) = pod["spec"]["volumes"]
    assert volume["persistentVolumeClaim"]["claimName"] == pvc["metadata"]["name"]
    (container,) = pod["spec"]["containers"]
    (mount,) = container["volumeMounts"]
    assert (mount["name"], mount["mountPath"]) == (volume["name"], tfjob.Settings(image="x").mount_path)
    assert pod["spec"]["securityContext"]["runAsUser"] == 1000  # the images' user
    bad = copy.deepcopy(pod)
    bad["spec"]["containers"][0]["volumeMounts"][0]["mountpath"] = "/gdmix"  # misspelt
    with pytest.raises(kv.ValidationError):
        kv.validate(bad, "1.30", strict=True)


def test_executor_command_starts_the_kubernetes_executor_backend_from_pyspark_jars(tmp_path):
    """The template's command, run by bash with the environment Spark gives an executor pod
    and a stand-in ``java`` that records its arguments."""
    import pyspark

    container = _template()["spec"]["containers"][0]
    java_home = tmp_path / "jdk"
    (java_home / "bin").mkdir(parents=True)
    record = tmp_path / "args"
    (java_home / "bin" / "java").write_text(f'#!/bin/sh\nprintf "%s\\n" "$@" > {record}\n')
    (java_home / "bin" / "java").chmod(0o755)
    env = {"PATH": f"{Path(sys.executable).parent}:/usr/bin:/bin", "JAVA_HOME": str(java_home),
           "SPARK_EXECUTOR_MEMORY": "6g", "SPARK_DRIVER_URL": "spark://CoarseGrainedScheduler@10.4.2.7:7078",
           "SPARK_EXECUTOR_ID": "3", "SPARK_EXECUTOR_CORES": "2", "SPARK_APPLICATION_ID": "spark-app-1",
           "SPARK_EXECUTOR_POD_IP": "10.4.3.9", "SPARK_EXECUTOR_POD_NAME": "gdmix-exec-3",
           "SPARK_RESOURCE_PROFILE_ID": "0",
           **{f"SPARK_JAVA_OPT_{i}": f"-Dopt{i}=a b" for i in (0, 1, 2, 10)}}
    subprocess.run([*container["command"], "executor"], env=env, check=True, timeout=60)
    args = record.read_text().splitlines()
    spark_home = Path(pyspark.__file__).parent
    assert args[:4] == ["-Dopt0=a b", "-Dopt1=a b", "-Dopt2=a b", "-Dopt10=a b"]  # numeric order, words kept
    assert args[4:8] == ["-Xms6g", "-Xmx6g", "-cp", f"{spark_home}/jars/*"]
    main = "org.apache.spark.scheduler.cluster.k8s.KubernetesExecutorBackend"
    assert args[8] == main
    assert dict(zip(args[9::2], args[10::2])) == {
        "--driver-url": env["SPARK_DRIVER_URL"], "--executor-id": "3", "--cores": "2", "--app-id": "spark-app-1",
        "--hostname": "10.4.3.9", "--resourceProfileId": "0", "--podName": "gdmix-exec-3"}
    # the class is in the installed pyspark's jars
    jars = list((spark_home / "jars").glob("spark-kubernetes_*.jar"))
    assert jars and any(main.replace(".", "/") + ".class" in zipfile.ZipFile(j).namelist() for j in jars)
