"""The registry of coordinate kinds: which kind a coordinate is, and what it answers.

Adding a kind: write its module (a ``Kind`` subclass, ``gdmix.kinds.base``) and add it
to ``REGISTRY`` below: nothing else asks for kind names. ``solver: auto`` is the one
choice made from the data: the partition stage calls ``resolve_auto`` once and records
the kind it chose; ``for_step`` reads that record back.
"""
from __future__ import annotations

from gdmix import config, layout, storage
from gdmix.config import Config, ConfigError, Coordinate
from gdmix.kinds import dnn, external, linear, per_cohort, per_entity
from gdmix.kinds.base import ONE_TASK, SHARDED, Kind, Partitioning, TrainContext
from gdmix.plan import Step

REGISTRY: tuple[Kind, ...] = (linear.KIND, dnn.KIND, external.KIND, per_entity.KIND, per_cohort.KIND)
AUTO = "auto"  # random effects: per_cohort or per_entity, chosen by partition from the train split
# ``solver: auto`` before partition has seen the data: planned (and compiled) as per-entity shards.
AUTO_PLANNED, AUTO_CHOICES = per_entity.KIND, (per_cohort.KIND, per_entity.KIND)

__all__ = ["REGISTRY", "AUTO", "Kind", "Partitioning", "TrainContext", "ONE_TASK", "SHARDED",
           "of", "by_name", "for_step", "resolve_auto", "validate", "parse_config", "load_config"]


def _selector_value(coord: Coordinate) -> str:
    return coord.model if coord.is_fixed_effect else coord.solver


def _select(coord: Coordinate) -> Kind | None:
    value = _selector_value(coord)
    return next((k for k in REGISTRY if k.type == coord.type and value in k.selector), None)


def of(coord: Coordinate) -> Kind:
    """The coordinate's kind as configured (``solver: auto``: as planned, per-entity)."""
    kind = _select(coord)
    if kind is None:
        if is_auto(coord):
            return AUTO_PLANNED
        raise ConfigError(f"coordinate {coord.name!r}: {_selector_key(coord)} {_selector_value(coord)!r} "
                          f"names no kind (known: {', '.join(_known(coord))})")
    return kind


def by_name(name: str) -> Kind:
    for k in REGISTRY:
        if k.name == name:
            return k
    raise ValueError(f"no coordinate kind named {name!r} (known: {[k.name for k in REGISTRY]})")


def for_step(cfg: Config, workdir: str, step: Step) -> Kind:
    """The kind that trains ``step``: ``of`` its coordinate, with ``solver: auto`` as the
    partition stage resolved it for this step."""
    coord = cfg.coordinate(step.coordinate)
    if is_auto(coord):
        info = storage.done_info(layout.step_dir(workdir, step.iteration, step.coordinate), "partition") or {}
        if "kind" in info:
            return by_name(info["kind"])
    return of(coord)


def resolve_auto(coord: Coordinate, n_entities: int, n_rows: int) -> Kind:
    """The kind ``solver: auto`` takes for a train split with this many entities and rows."""
    if is_auto(coord):
        if coord.l2_auto is not None:  # λ's estimate needs each entity's Hessian: the per-entity solver
            return AUTO_PLANNED
        return next(k for k in AUTO_CHOICES if k.suits(n_entities, n_rows))
    return of(coord)


def is_auto(coord: Coordinate) -> bool:
    """A random effect with ``solver: auto``: its kind is chosen from the data."""
    return not coord.is_fixed_effect and coord.solver == AUTO


def _selector_key(coord: Coordinate) -> str:
    return "model" if coord.is_fixed_effect else "solver"


def _known(coord: Coordinate) -> list[str]:
    known = [v for k in REGISTRY if k.type == coord.type for v in k.selector]
    return known + ([] if coord.is_fixed_effect else [AUTO])


def validate(cfg: Config) -> Config:
    """Every coordinate names a kind, and each kind accepts its settings; errors name the key."""
    for i, coord in enumerate(cfg.coordinates):
        path = f"coordinates[{i}]"
        if _select(coord) is None and not is_auto(coord):
            raise ConfigError(f"{path}.{_selector_key(coord)}: must be one of {tuple(_known(coord))}, "
                              f"got {_selector_value(coord)!r}")
        of(coord).validate(cfg, coord, path)
    return cfg


def parse_config(raw: dict, source: str | None = None) -> Config:
    """``config.parse`` and every kind's own checks."""
    return validate(config.parse(raw, source))


def load_config(path: str, workdir: str | None = None) -> Config:
    """``config.load`` and every kind's own checks (errors name the file and the key)."""
    cfg = config.load(path, workdir)
    try:
        return validate(cfg)
    except ConfigError as e:
        raise ConfigError(f"{path}: {e}") from None
