"""Where each stage reads and writes inside the work directory (docs/design.md §4.4).

    prepared/{train,validation}/part-*.parquet      indexed rows
    prepared/features/<bag>.parquet                 feature index: index -> (name, term)
    iter-<k>/<step coordinate>/partition/<split>/shard=<s>/
    iter-<k>/<step coordinate>/coefficients/<coordinate>/part-*.parquet
    iter-<k>/<step coordinate>/scores/<coordinate>/<split>/part-*.parquet
    iter-<k>/<step coordinate>/metrics.json
    models/<coordinate>/                            final name-term-value models
    metrics.json, objective.json, report.html
"""
from __future__ import annotations

from gdmix.storage import join

SPLITS = ("train", "validation")


def prepared(workdir: str, split: str) -> str:
    return join(workdir, "prepared", split)


def prepared_root(workdir: str) -> str:
    return join(workdir, "prepared")


def feature_index(workdir: str, bag: str) -> str:
    return join(workdir, "prepared", "features", f"{bag}.parquet")


def step_dir(workdir: str, iteration: int, coordinate: str) -> str:
    return join(workdir, f"iter-{iteration}", coordinate)


def partition_root(workdir: str, iteration: int, coordinate: str) -> str:
    return join(step_dir(workdir, iteration, coordinate), "partition")


def partition(workdir: str, iteration: int, coordinate: str, split: str) -> str:
    return join(partition_root(workdir, iteration, coordinate), split)


def shard(partition_url: str, shard_index: int) -> str:
    return join(partition_url, f"shard={shard_index}")


def coefficients(workdir: str, iteration: int, step_coordinate: str, coordinate: str) -> str:
    return join(step_dir(workdir, iteration, step_coordinate), "coefficients", coordinate)


def scores(workdir: str, iteration: int, step_coordinate: str, coordinate: str, split: str) -> str:
    return join(step_dir(workdir, iteration, step_coordinate), "scores", coordinate, split)


def step_metrics(workdir: str, iteration: int, coordinate: str) -> str:
    return join(step_dir(workdir, iteration, coordinate), "metrics.json")


def model(workdir: str, coordinate: str) -> str:
    return join(workdir, "models", coordinate)


def metrics(workdir: str) -> str:
    return join(workdir, "metrics.json")


def objective(workdir: str) -> str:
    return join(workdir, "objective.json")


def report(workdir: str) -> str:
    return join(workdir, "report.html")


def shard_dir(workdir: str, iteration: int, coordinate: str, shard_index: int) -> str:
    """A random-effect shard's own output folder (its models and done marker)."""
    return join(step_dir(workdir, iteration, coordinate), "shards", f"shard-{shard_index}")


def shard_coefficients(workdir: str, iteration: int, coordinate: str, shard_index: int) -> str:
    return join(shard_dir(workdir, iteration, coordinate, shard_index), "coefficients.parquet")
