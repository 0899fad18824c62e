"""The driver JVM's options: C1-only JIT for small embedded inputs, C2 otherwise."""
import pyarrow as pa
import pyarrow.parquet as pq

from gdmix import config
from gdmix import spark as gspark
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
