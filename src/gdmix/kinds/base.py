"""The coordinate-kind protocol: everything a kind of coordinate says about itself.

A coordinate's kind (a linear fixed effect, a deep one, external scores, a model per
entity, a data-parallel model per cohort) decides how its rows are partitioned, how it
trains (in one process, as one pipeline task, or as shards and a finish), how it scores
new rows and what it exports. The generic stages (prepare, partition, the training
dispatcher, models, the driver, the CLI and the pipeline builder) ask the coordinate's
kind (``gdmix.kinds.of``) and never compare kind names themselves. See docs/design.md §5.

A kind subclasses ``Kind`` and overrides what differs from the defaults; the defaults
are those of a kind that reads nothing extra from the input and trains in one task.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

from gdmix import ntv, ntv_arrow
from gdmix.config import Config, Coordinate
from gdmix.plan import Step

# How a kind's training maps onto pipeline tasks.
ONE_TASK = "one_task"  # one training task (on a cluster: a TFJob when it runs TF workers)
SHARDED = "sharded"  # a task per shard (in parallel), then a finish task


@dataclass(frozen=True)
class Partitioning:
    """How the partition stage lays out a coordinate's rows for its trainer.

    ``by``: rows are sharded by "uid" (any row anywhere: data-parallel workers) or by
    "entity" (each shard holds whole entities); ``shards``: how many; ``entity_column``:
    whether the rows carry the entity id; ``prepared_first``: when the coordinate trains
    before any other one, its workers read slices of the prepared split and the partition
    writes no rows; ``rows_once``: rows are grouped by entity in the coordinate's first
    pass only, later passes write just the new offsets by uid (the trainer joins them onto
    the first pass's rows, ``gdmix.random_effect.shards.read_shard``)."""

    by: str
    shards: int
    entity_column: bool
    prepared_first: bool = False
    rows_once: bool = False


@dataclass
class TrainContext:
    """What the app layer hands to training: the launcher that runs TF workers (local
    processes or a TFJob; None = local processes) and the embedded run's serving workers."""

    launcher: Callable | None = None
    prestarted: Any = None


class Kind:
    """A kind of coordinate. ``type`` and ``selector``: the config values that select it
    (``type: fixed_effect`` with ``model: <value>``; ``type: random_effect`` with
    ``solver: <value>``)."""

    name: str = ""
    type: str = ""
    selector: tuple[str, ...] = ()
    pipeline_tasks: str = ONE_TASK
    tf_workers: bool = False  # trains on TF workers (a TFJob on a cluster)
    convex: bool = True  # its training objective is convex: block descent never raises the total

    # --- config ---
    def validate(self, cfg: Config, coord: Coordinate, path: str) -> None:
        """Check the coordinate's kind-specific settings; raise ConfigError naming ``path``."""

    # --- prepare ---
    def check_input(self, df, cfg: Config, coord: Coordinate, where: str) -> None:
        """Check the kind's own input columns (Spark DataFrame ``df`` read from ``where``)."""

    def prepared_columns(self, cfg: Config, coord: Coordinate, workdir: str, train_df) -> list[tuple[str, Any]]:
        """(prepared column, Spark expression over the input) the kind adds to the prepared
        rows of both splits; may save what it learns from ``train_df`` into the workdir."""
        return []

    def suits(self, n_entities: int, n_rows: int) -> bool:
        """Whether ``solver: auto`` may take this kind for a train split of this size."""
        return True

    # --- partition ---
    def partitioning(self, coord: Coordinate) -> Partitioning:
        raise NotImplementedError

    # --- training ---
    def train(self, cfg: Config, workdir: str, step: Step, ctx: TrainContext) -> dict:
        """Train the step in this process (workers it starts included) and record it."""
        raise NotImplementedError

    def train_shard(self, cfg: Config, workdir: str, step: Step, shard: int, ctx: TrainContext) -> dict:
        raise ValueError(f"{step}: a {self.name} coordinate trains as one task, not by shard")

    def finish(self, cfg: Config, workdir: str, step: Step) -> dict:
        raise ValueError(f"{step}: a {self.name} coordinate trains as one task: nothing to finish")

    def serving_workers(self, cfg: Config, coord: Coordinate):
        """Local TF workers started once to serve every training step of this coordinate
        in an embedded run (closed by the caller), or None: the kind has none."""
        return None

    def warm_up(self, cfg: Config, coord: Coordinate) -> None:
        """Load what the first training step would otherwise load on the critical path
        (called on a thread while the embedded run prepares); errors resurface there."""

    # --- models ---
    def export(self, cfg: Config, workdir: str, coord: Coordinate, step: Step) -> str:
        """Write ``models/<coordinate>/`` from the step holding its latest model; its URL."""
        raise NotImplementedError

    def score_frame(self, spark, cfg: Config, coord: Coordinate, workdir: str, raw):
        """A Spark frame (uid, ``<coordinate>_score``) over raw rows, from the exported model."""
        raise NotImplementedError

    def in_memory_scorer(self, cfg: Config, coord: Coordinate, models_url: str):
        """A function of raw rows (a pyarrow Table) giving this coordinate's term of each
        row's score, computed in memory (pyarrow and numpy, no Spark) from its exported
        model in ``models_url``: what ``score_frame`` computes (the Python API's). The
        default: none, the kind is scored by ``gdmix score`` only."""
        def unavailable(rows):
            raise NotImplementedError(f"coordinate {coord.name!r}: a {self.name} coordinate is scored by "
                                      "`gdmix score` (Spark), not in memory")
        return unavailable


class NameTermValueKind(Kind):
    """A kind whose models are name-term-value records over its bag (a model per entity,
    or the fixed effect's ``global`` one): exported, and scored in Spark and in memory,
    by ``gdmix.ntv`` and ``gdmix.ntv_arrow``."""

    def export(self, cfg: Config, workdir: str, coord: Coordinate, step: Step) -> str:
        return ntv.export(cfg, workdir, coord, step)

    def score_frame(self, spark, cfg: Config, coord: Coordinate, workdir: str, raw):
        return ntv.score_frame(spark, cfg, coord, workdir, raw)

    def in_memory_scorer(self, cfg: Config, coord: Coordinate, models_url: str):
        return ntv_arrow.scorer(cfg, coord, models_url)
