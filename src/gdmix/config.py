"""The run configuration: one YAML file, validated on load.

Every error names the offending key as a path (``coordinates[1].l2``) and says what is
wrong, so a user can fix the file without reading this module. This module checks the
shape of every key; which kind a coordinate's ``model`` or ``solver`` selects, and that
kind's own settings (a deep model's ``dnn``, an external fixed effect's scores), are
checked by the kind: ``gdmix.kinds.load_config`` loads a config and checks both. Every
key's type, default, bounds and meaning are declared in ``gdmix.config_spec`` and read by
those declarations; the YAML-reading machinery is ``gdmix.config_keys``; the metric names,
``gdmix.metric_names``.
"""
from __future__ import annotations

import dataclasses
import os
import re
from dataclasses import dataclass, field

import yaml

from gdmix import config_spec as spec
from gdmix.config_keys import ConfigError, Section, check_name, coerce, mapping, positive
from gdmix.config_spec import (COORDINATE_TYPES, FIXED_EFFECT, HESSIAN_SETTINGS, RANDOM_EFFECT,  # noqa: F401
                               TASKS, VARIANCE_SETTINGS)
from gdmix.config_spec import L2_AUTO  # noqa: F401
from gdmix.metric_names import DEFAULT_METRICS, default_metrics, parse_metrics

RESERVED_STEP = "_joint"  # the joint Newton step's folder (iter-<k>/_joint/): no coordinate may take it

# The dataclasses' defaults serve code that builds a Config directly; a config file's come
# from ``gdmix.config_spec`` (tests/test_config_reference.py keeps the two equal).
@dataclass(frozen=True)
class Columns:
    uid: str = "uid"
    label: str = "label"
    # Used when present in the data (else weight 1 / offset 0); ``null`` ignores them.
    weight: str | None = "weight"
    offset: str | None = "offset"


@dataclass(frozen=True)
class FeatureBag:
    name: str
    columns: tuple[str, ...] | None = None  # plain numeric columns: name = column, term = ""
    ntv: str | None = None  # a list<struct<name, term, value>> column

    @property
    def source(self) -> tuple[str, ...]:
        """Input columns the bag reads."""
        return (self.ntv,) if self.ntv else tuple(self.columns or ())

    def shares_values_with(self, other: "FeatureBag") -> bool:
        """Whether a feature with the same (name, term) in both bags has the same value in
        every row: both read the same name-term-value column, or both are column bags (a
        column bag's feature is named by its column, so equal names mean the same column)."""
        if self.ntv or other.ntv:
            return self.ntv == other.ntv
        return True


@dataclass(frozen=True)
class Data:
    train: str
    feature_bags: dict[str, FeatureBag]
    validation: str | None = None
    validation_fraction: float = 0.2
    split_seed: int = 0
    columns: Columns = field(default_factory=Columns)


@dataclass(frozen=True)
class Coordinate:
    name: str
    type: str
    feature_bag: str
    l2: float = 1.0
    regularize_intercept: bool = False
    entity: str | None = None  # random effects: the entity id column
    workers: int = 1  # fixed effect: TF worker processes / TFJob replicas
    shards: int = 1  # random effect: entity shards (parallel pods on a cluster)
    min_samples: int = 1  # random effect: entities with fewer training rows are passive
    max_samples: int | None = None  # random effect: an entity with more trains on a hashed sample of that many
    model: str = "linear"  # fixed effect: selects its kind (gdmix.kinds: linear, dnn, external)
    external_scores: str | None = None  # model: external: an input column, or a Parquet of (uid, score)
    dnn: dict = field(default_factory=dict)  # model: dnn: its settings, checked by the dnn kind
    solver: str = "vectorised"  # random effect: selects its kind (per_entity: vectorised | scipy; per_cohort: data_parallel; auto)
    tolerance: float = 1e-10  # projected-gradient tolerance, relative to the data size
    max_iterations: int = 1000
    hessian: str = "auto"  # linear fixed effect: "matrix", "products" or "auto" (matrix up to 1,024 features)
    cpu: str | None = None  # on a cluster: CPU request of each TFJob worker (a Kubernetes quantity, e.g. "2", "500m")
    memory: str | None = None  # on a cluster: memory request (and limit) of each TFJob worker, e.g. "2Gi"
    variance: str = "none"  # coefficient variances written with the models: none | simple | full
    l2_grid: tuple[float, ...] | None = None  # l2: [λ, ...]: the grid searched (gdmix.grid; a pipeline: branches)
    l2_auto: str | None = None  # l2: auto: λ estimated from the data (gdmix.l2); l2 is then its start

    @property
    def is_fixed_effect(self) -> bool:
        return self.type == FIXED_EFFECT


@dataclass(frozen=True)
class Spark:
    master: str = "local[*]"
    driver_memory: str = "4g"
    # A cluster master (k8s://, spark://): executors and their size; 0 executors leaves
    # the count to the cluster manager. A local master ignores all three.
    executors: int = 0
    executor_cores: int = 1
    executor_memory: str = "4g"
    conf: dict[str, str] = field(default_factory=dict)


@dataclass(frozen=True)
class Timeouts:
    fixed_effect_seconds: float = 3600.0  # a hung TF worker never hangs the run
    worker_exit_seconds: float = 30.0  # grace period after the final barrier
    metrics_seconds: float = 3600.0  # the embedded driver's wait for a step's metrics


@dataclass(frozen=True)
class Publish:
    """Where a finished run's models, metrics and report are published (``gdmix publish``),
    and the gates ``latest`` must pass to move (see ``gdmix.publish``)."""
    to: str  # a folder URL: versions/<version>/ and latest.json go under it
    min_auc: float | None = None  # refuse a candidate whose validation AUC is lower
    max_auc_drop: float | None = None  # refuse one worse than the current latest by more


@dataclass(frozen=True)
class Prior:
    """``prior:``: a published model directory whose means and variances become each
    matched coefficient's penalty (weight/2)(θ − μ)²/σ² (``gdmix.priors``)."""
    models: str  # a folder URL holding <coordinate>/ model tables (a run's models/)
    weight: float = 1.0


@dataclass(frozen=True)
class Config:
    name: str
    workdir: str
    data: Data
    iterations: int
    coordinates: tuple[Coordinate, ...]
    metrics: tuple[str, ...] = DEFAULT_METRICS
    spark: Spark = field(default_factory=Spark)
    timeouts: Timeouts = field(default_factory=Timeouts)
    parallelism: int = 0  # processes for random effects; 0 = all cores
    publish: Publish | None = None  # the ``publish:`` mapping, if given
    select: str | None = None  # ``select: {metric: m}``: export the step best on m (None: the last step)
    warm_start: str | None = None  # a published model directory: the first steps' initial point
    prior: Prior | None = None  # the ``prior:`` mapping, if given
    acceleration: str = "newton"  # config_spec.ACCELERATIONS: the joint step after each pass (gdmix.plan)
    source: str | None = None  # the YAML path this was loaded from
    task: str = "logistic"  # the loss: logistic | linear | poisson (gdmix.losses)

    def coordinate(self, name: str) -> Coordinate:
        for c in self.coordinates:
            if c.name == name:
                return c
        raise ConfigError(f"coordinates: no coordinate named {name!r}")

    @property
    def fixed_effect(self) -> Coordinate | None:
        return next((c for c in self.coordinates if c.is_fixed_effect), None)

    def bag(self, name: str) -> FeatureBag:
        return self.data.feature_bags[name]

    def with_workdir(self, workdir: str) -> "Config":
        return dataclasses.replace(self, workdir=workdir)


def _feature_bags(sec: Section) -> dict[str, FeatureBag]:
    bags = {}
    if not sec.raw:
        raise ConfigError(f"{sec.path}: at least one feature bag is required")
    for name in sec.raw:
        check_name(name, f"{sec.path}.{name}")
        b = Section(sec.raw[name], f"{sec.path}.{name}", spec.FEATURE_BAG)
        columns, ntv = b.get("columns"), b.get("ntv")
        b.finish()
        if (columns is None) == (ntv is None):
            raise ConfigError(f"{b.path}: give exactly one of 'columns' (numeric columns) "
                              "or 'ntv' (a name-term-value column)")
        bags[name] = FeatureBag(name=name, columns=columns, ntv=ntv)
    return bags


def _l2(raw, key: str, is_re: bool) -> tuple[float, tuple[float, ...] | None, str | None]:
    """``l2``: a number; a list of numbers (a grid, searched by ``gdmix.grid``); ``auto``
    or ``{auto: coordinate | per_feature, initial: λ0}`` (random effects: λ estimated from
    the data, ``gdmix.l2``). Returns (λ: the value, the grid's largest or auto's start;
    the grid; the auto mode)."""
    if raw == "auto" or isinstance(raw, dict):
        a = Section({"auto": "coordinate"} if raw == "auto" else raw, key)
        mode = a.get("auto", str)
        initial = positive(a.get("initial", float, 1.0), a.key("initial"))
        a.finish()
        if mode not in L2_AUTO:
            raise ConfigError(f"{a.key('auto')}: must be one of {L2_AUTO}, got {mode!r}")
        if not is_re:
            raise ConfigError(f"{key}: auto is for random effects (λ is estimated from the entities' "
                              "models); give the fixed effect a number or a grid")
        return initial, None, mode
    if isinstance(raw, list):
        if not raw:
            raise ConfigError(f"{key}: an empty grid; give at least one λ")
        grid = tuple(positive(coerce(v, float, f"{key}[{i}]"), f"{key}[{i}]") for i, v in enumerate(raw))
        if len(set(grid)) != len(grid):
            raise ConfigError(f"{key}: the grid repeats a value: {list(grid)}")
        return max(grid), grid, None
    if isinstance(raw, str):
        raise ConfigError(f"{key}: expected float, a list of floats (a grid) or auto, got {raw!r}")
    return positive(coerce(raw, float, key), key, allow_zero=True), None, None


def _coordinate(raw, path, bags) -> Coordinate:
    ctype = Section(raw, path, spec.COORDINATE).get("type")
    s = Section(raw, path, spec.BY_TYPE[ctype])
    bag = s.get("feature_bag")
    if bag not in bags:
        raise ConfigError(f"{s.key('feature_bag')}: no feature bag named {bag!r} "
                          f"(data.feature_bags has {sorted(bags)})")
    common = {k.name: s.get(k.name) for k in spec.COORDINATE}
    own = {k.name: s.get(k.name) for k in spec.BY_TYPE[ctype][len(spec.COORDINATE):]}
    if "dnn" in own:
        own["dnn"] = mapping(own["dnn"], s.key("dnn"))  # its keys: checked by the dnn kind
    l2, l2_grid, l2_auto = _l2(common.pop("l2"), s.key("l2"), ctype == RANDOM_EFFECT)
    c = Coordinate(**common, **own, l2=l2, l2_grid=l2_grid, l2_auto=l2_auto)
    if c.name == RESERVED_STEP:
        raise ConfigError(f"{s.key('name')}: {RESERVED_STEP!r} is reserved for the joint Newton step")
    if c.max_samples is not None and c.max_samples < c.min_samples:
        raise ConfigError(f"{s.key('max_samples')}: must be >= min_samples ({c.min_samples}), "
                          f"got {c.max_samples}")
    s.finish()
    return c


def _select(sec: Section | None, metrics: tuple[str, ...]) -> str | None:
    """``select: {metric: m}``: m must be one of the configured metrics."""
    if sec is None:
        return None
    metric = sec.get("metric")
    sec.finish()
    if metric not in metrics:
        raise ConfigError(f"select.metric: {metric!r} is not one of the configured metrics {list(metrics)}")
    return metric


def parse(raw: dict, source: str | None = None) -> Config:
    top = Section(raw, "", spec.TOP)
    d = top.section("data", required=True)
    cols = d.section("columns")
    columns = Columns(**{k.name: cols.get(k.name) for k in spec.COLUMNS})
    cols.finish()
    bags = _feature_bags(d.section("feature_bags", required=True))
    data = Data(
        train=d.get("train"),
        validation=d.get("validation"),
        validation_fraction=d.get("validation_fraction"),
        split_seed=d.get("split_seed"),
        columns=columns,
        feature_bags=bags,
    )
    d.finish()

    raw_coords = raw.get("coordinates")  # declared in spec.TOP; an absent list is this error too
    if not isinstance(raw_coords, list) or not raw_coords:
        raise ConfigError("coordinates: expected a non-empty list of coordinates")
    coords = tuple(_coordinate(c, f"coordinates[{i}]", bags) for i, c in enumerate(raw_coords))
    names = [c.name for c in coords]
    for i, n in enumerate(names):
        if n in names[:i]:
            raise ConfigError(f"coordinates[{i}].name: duplicate coordinate name {n!r}")
    if sum(c.is_fixed_effect for c in coords) > 1:
        raise ConfigError("coordinates: at most one fixed_effect coordinate is supported")

    task = top.get("task")
    # the default metrics follow the task (the declared default is the logistic one)
    metrics = parse_metrics(top.get("metrics") if "metrics" in raw else list(default_metrics(task)), coords, task)
    select = _select(top.section("select") if raw.get("select") is not None else None, metrics)

    sp = top.section("spark")
    spark = Spark(**{k.name: sp.get(k.name) for k in spec.SPARK})
    sp.finish()
    to = top.section("timeouts")
    timeouts = Timeouts(**{k.name: to.get(k.name) for k in spec.TIMEOUTS})
    to.finish()
    publish = None
    if raw.get("publish") is not None:
        pb = top.section("publish")
        publish = Publish(**{k.name: pb.get(k.name) for k in spec.PUBLISH})
        if (publish.min_auc is not None or publish.max_auc_drop is not None) and task != "logistic":
            raise ConfigError(f"publish: min_auc and max_auc_drop gate on the AUC, which task {task!r} "
                              "does not record")
        pb.finish()
    prior = None
    if raw.get("prior") is not None:
        pr = top.section("prior")
        prior = Prior(**{k.name: pr.get(k.name) for k in spec.PRIOR})
        pr.finish()

    for i, c in enumerate(coords):
        if c.l2_auto and prior is not None:  # a prior sets its own per-coefficient weights
            raise ConfigError(f"coordinates[{i}].l2: auto does not combine with prior: (the prior's "
                              "variances set the penalty); give a number")
        if c.l2_auto and c.solver == "data_parallel":
            raise ConfigError(f"coordinates[{i}].l2: auto needs the per-entity solver (vectorised or "
                              "scipy), not data_parallel")
    cfg = Config(
        name=top.get("name"),
        workdir=top.get("workdir"),
        data=data,
        iterations=top.get("iterations"),
        coordinates=coords,
        metrics=metrics,
        spark=spark,
        timeouts=timeouts,
        parallelism=top.get("parallelism"),
        publish=publish,
        select=select,
        warm_start=top.get("warm_start"),
        prior=prior,
        acceleration=top.get("acceleration"),
        source=source,
        task=task,
    )
    top.finish()
    return cfg


def load(path: str, workdir: str | None = None, resolve_inputs: bool = True) -> Config:
    """Load and validate a YAML config; ``workdir`` overrides the file's; its relative
    input paths resolved against its folder (``resolve_data_paths``) unless not
    ``resolve_inputs``."""
    from gdmix import storage

    try:
        with storage.open_file(path, "r") as f:
            raw = yaml.safe_load(f)
    except FileNotFoundError:
        raise ConfigError(f"{path}: config file not found") from None
    except yaml.YAMLError as e:
        raise ConfigError(f"{path}: not valid YAML: {e}") from None
    if raw is None:
        raise ConfigError(f"{path}: the config file is empty")
    try:
        cfg = parse(raw, source=path)
    except ConfigError as e:
        raise ConfigError(f"{path}: {e}") from None
    if resolve_inputs:
        cfg = resolve_data_paths(cfg, path)
    return cfg.with_workdir(workdir) if workdir else cfg


def _is_relative(value: str) -> bool:
    return "://" not in value and not os.path.isabs(value)


def _exists(url: str) -> bool:
    from gdmix import storage

    fs, p = storage.filesystem(url)
    return bool(fs.glob(p)) if any(ch in p for ch in "*?[") else fs.exists(p)


def resolve_data_paths(cfg: Config, config_path: str) -> Config:
    """The inputs a config names (``data.train``, ``data.validation``, ``warm_start``,
    ``prior.models``) given as relative paths mean relative to the config file's folder (a
    URL's too), and become that path, so every message names the path actually read. The
    outputs (``workdir``, ``publish.to``) stay relative to the current directory. A relative path found only in the current directory (configs
    written before this rule) is still read from there, with a warning."""
    import sys

    from gdmix import storage

    remote = "://" in config_path
    base = config_path.rsplit("/", 1)[0] if remote else os.path.dirname(os.path.abspath(config_path))

    def resolve(key: str, value: str | None) -> str | None:
        if not value or not _is_relative(value):
            return value
        here = storage.join(base, value) if remote else os.path.normpath(os.path.join(base, value))
        if not _exists(here) and _exists(value):
            print(f"gdmix: warning: {key}: {value!r} is not in the config file's folder ({base}); "
                  f"reading {os.path.abspath(value)} from the current directory instead: write it "
                  "relative to the config file", file=sys.stderr, flush=True)
            return os.path.abspath(value)
        return here

    data = dataclasses.replace(cfg.data, train=resolve("data.train", cfg.data.train),
                               validation=resolve("data.validation", cfg.data.validation))
    # The other inputs a config names: earlier runs' published models.
    prior = cfg.prior and dataclasses.replace(cfg.prior, models=resolve("prior.models", cfg.prior.models))
    return dataclasses.replace(cfg, data=data, prior=prior, warm_start=resolve("warm_start", cfg.warm_start))


def cpu_count(cfg: Config) -> int:
    return cfg.parallelism or os.cpu_count() or 1


def to_raw(cfg: Config) -> dict:
    """The config in its YAML shape (inverse of ``parse``)."""
    d = cfg.data
    bags = {b.name: ({"ntv": b.ntv} if b.ntv else {"columns": list(b.columns)}) for b in d.feature_bags.values()}
    coords = []
    for c in cfg.coordinates:
        raw = {k: v for k, v in dataclasses.asdict(c).items() if v is not None}
        raw.pop("l2_grid", None), raw.pop("l2_auto", None)
        if c.l2_grid is not None:
            raw["l2"] = list(c.l2_grid)
        elif c.l2_auto is not None:
            raw["l2"] = {"auto": c.l2_auto, "initial": c.l2}
        if c.is_fixed_effect:
            for k in ("entity", "shards", "min_samples", "max_samples", "solver"):
                raw.pop(k, None)
            if not c.dnn:
                raw.pop("dnn", None)
        else:
            for k in ("workers", "model", "dnn", "hessian"):
                raw.pop(k, None)
        coords.append(raw)
    return {
        "name": cfg.name,
        "workdir": cfg.workdir,
        **({"task": cfg.task} if cfg.task != "logistic" else {}),
        "data": {
            "train": d.train,
            "validation": d.validation,
            "validation_fraction": d.validation_fraction,
            "split_seed": d.split_seed,
            "columns": dataclasses.asdict(d.columns),
            "feature_bags": bags,
        },
        "iterations": cfg.iterations,
        "coordinates": coords,
        "metrics": list(cfg.metrics),
        "spark": dataclasses.asdict(cfg.spark),
        "timeouts": dataclasses.asdict(cfg.timeouts),
        "parallelism": cfg.parallelism,
        **({"publish": {k: v for k, v in dataclasses.asdict(cfg.publish).items() if v is not None}}
           if cfg.publish else {}),
        **({"select": {"metric": cfg.select}} if cfg.select else {}),
        **({"warm_start": cfg.warm_start} if cfg.warm_start else {}),
        **({"prior": dataclasses.asdict(cfg.prior)} if cfg.prior else {}),
        "acceleration": cfg.acceleration,
    }


RUN_CONFIG = "config.yaml"


def snapshot(cfg: Config) -> str:
    """Write the run's config into its work directory, so every later stage, worker
    process or pod reads exactly the same settings from ``<workdir>/config.yaml``."""
    from gdmix import storage

    url = storage.join(cfg.workdir, RUN_CONFIG)
    storage.write_text(url, yaml.safe_dump(to_raw(cfg), sort_keys=False))
    return url


def load_run(workdir: str) -> Config:
    """The config snapshot of a run (written by ``snapshot``), with this workdir. Its paths
    are the run's own (a config file's were resolved when it was loaded): not resolved
    again against the work directory."""
    from gdmix import storage

    return load(storage.join(workdir, RUN_CONFIG), workdir=workdir, resolve_inputs=False)
