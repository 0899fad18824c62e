"""The Python API: train and score GLMix models from a notebook, scikit-learn style.

    from gdmix import GLMix

    model = GLMix.from_config("my.yaml")          # or a dict in the config's YAML shape
    model.fit(train_df, validation=val_df)        # pandas, pyarrow or a Parquet path
    p = model.predict_proba(test_df)[:, 1]        # P(label = 1), in memory (no Spark)
    s = model.decision_function(test_df)          # the log-odds, = `gdmix score`'s `score`
    parts = model.decompose(test_df)              # uid, offset, one column per coordinate, score

    model = GLMix.load("runs/my-run/models")      # a finished run's models

``fit`` runs the embedded driver (``gdmix run``: local Spark, local TF workers) in the
config's work directory; a DataFrame or Table is first written there as
``input/<split>.parquet``. Scoring is in memory with pyarrow and numpy and gives what
``gdmix score`` gives (``score`` = offset + every coordinate's term), for linear fixed
effects, per-entity and per-cohort random effects and external scores; a deep
(``model: dnn``) fixed effect by its saved Keras model with TensorFlow in this process
(``gdmix.deep.scoring``; equal to ``gdmix score`` to float32 precision).

``load`` needs the run's config next to the models (``<run>/config.yaml``, the snapshot
every run writes: it names the feature bags, the entity columns, the uid and offset
columns); for models copied elsewhere (a published version) pass ``config=``.
"""
from __future__ import annotations

import dataclasses
import os
import posixpath
import tempfile

import numpy as np
import pyarrow as pa

from gdmix import config as gconfig
from gdmix import kinds, layout, losses, schema, storage
from gdmix.config import Config

PLACEHOLDER_TRAIN = "(given to fit)"


def _to_table(data) -> pa.Table:
    """A pandas DataFrame, a pyarrow Table or a Parquet path (file, folder, URL) as a Table."""
    if isinstance(data, pa.Table):
        return data
    if isinstance(data, (str, os.PathLike)):
        return storage.read_table(str(data))
    if type(data).__module__.split(".")[0] == "pandas":
        return pa.Table.from_pandas(data, preserve_index=False)
    raise TypeError(f"expected a pandas DataFrame, a pyarrow Table or a Parquet path, got {type(data).__name__}")


def _config(source) -> Config:
    if isinstance(source, Config):
        return source
    if isinstance(source, dict):
        raw = dict(source)
        raw.setdefault("workdir", tempfile.mkdtemp(prefix="gdmix-"))
        raw["data"] = dict(raw.get("data") or {})
        raw["data"].setdefault("train", PLACEHOLDER_TRAIN)
        return kinds.parse_config(raw)
    return kinds.load_config(str(source))


class GLMix:
    """A GLMix model: a fixed effect plus per-entity random effects (see the README).

    Attributes after ``fit`` or ``load``: ``config`` (a ``gdmix.config.Config``),
    ``models_url`` (the ``models/`` folder scored from), ``metrics_`` (``fit`` only: the
    validation record of every coordinate-descent step)."""

    def __init__(self, config: Config):
        self.config = config
        self.models_url: str | None = None
        self.metrics_: list[dict] | None = None
        self._scorers: dict | None = None  # coordinate -> its in-memory scorer (after fit / load)

    # --- construction ---
    @classmethod
    def from_config(cls, config, workdir: str | None = None) -> "GLMix":
        """From a YAML file's path or a dict in its shape (a dict may leave out
        ``workdir``: a new temporary folder, and ``data.train``: given to ``fit``);
        ``workdir`` overrides the config's."""
        cfg = _config(config)
        return cls(cfg.with_workdir(workdir) if workdir else cfg)

    @classmethod
    def load(cls, models_url: str, config=None) -> "GLMix":
        """A finished run's models: ``models_url`` is its ``models/`` folder; the config is
        the run's snapshot beside it (``<run>/config.yaml``) unless given (a path or a dict)."""
        models_url = str(models_url).rstrip("/")
        if config is None:
            run = posixpath.dirname(models_url) if "://" in models_url else os.path.dirname(models_url)
            snapshot = storage.join(run, gconfig.RUN_CONFIG)
            if not storage.exists(snapshot):
                raise FileNotFoundError(f"{snapshot}: no run config beside {models_url} "
                                        "(pass config= with the config the models were trained with)")
            cfg = kinds.validate(gconfig.load(snapshot, workdir=run))
        else:
            cfg = _config(config)
        self = cls(cfg)
        self._read_models(models_url)
        return self

    # --- training ---
    def fit(self, train, validation=None, restart: bool = False) -> "GLMix":
        """Train with the embedded driver (``gdmix run``) in the config's work directory.

        ``train``/``validation``: a pandas DataFrame, a pyarrow Table or a Parquet path (a
        file, a folder or a glob); without ``validation``, the config's split of train.
        A rerun with the same data and config skips what is done (``restart`` redoes all)."""
        from gdmix import driver

        cfg = self.config
        data = dataclasses.replace(cfg.data, train=self._input(train, "train"),
                                   validation=None if validation is None else self._input(validation, "validation"))
        cfg = kinds.validate(dataclasses.replace(cfg, data=data))
        self.metrics_ = driver.run(cfg, restart=restart)
        self.config = cfg
        self._read_models(posixpath.dirname(layout.model(cfg.workdir, "any")))
        return self

    def _input(self, data, split: str) -> str:
        if isinstance(data, (str, os.PathLike)):
            return storage.absolute(str(data))
        table = _to_table(data)
        url = storage.absolute(storage.join(self.config.workdir, "input", f"{split}.parquet"))
        # The same rows again keep the file (and its fingerprint): a rerun skips what is done.
        if not (storage.exists(url) and storage.read_table(url).equals(table)):
            storage.write_table(url, table)
        return url

    def _read_models(self, models_url: str) -> None:
        """Each coordinate's in-memory scorer, as its kind builds it from ``models_url``."""
        self._scorers = {c.name: kinds.of(c).in_memory_scorer(self.config, c, models_url)
                         for c in self.config.coordinates}
        self.models_url = models_url

    # --- scoring ---
    def _check_fitted(self) -> None:
        if self._scorers is None:
            raise RuntimeError("this GLMix has no models yet: call fit(...) or GLMix.load(models_url)")

    def _terms(self, data) -> tuple[pa.Table, np.ndarray, dict[str, np.ndarray]]:
        self._check_fitted()
        rows = _to_table(data)
        cols = self.config.data.columns
        if cols.uid not in rows.column_names:
            raise KeyError(f"column {cols.uid!r} (the uid) is missing from the rows to score "
                           f"(columns present: {', '.join(rows.column_names)})")
        if cols.offset and cols.offset in rows.column_names:
            offset = rows.column(cols.offset).cast(pa.float64()).to_numpy(zero_copy_only=False)
        else:
            offset = np.zeros(rows.num_rows)
        terms = {c.name: self._scorers[c.name](rows) for c in self.config.coordinates}
        return rows, offset, terms

    def decision_function(self, data) -> np.ndarray:
        """Each row's linear predictor s = offset + every coordinate's term (``gdmix
        score``'s ``score``; log-odds for the logistic task), in the rows' order."""
        _, offset, terms = self._terms(data)
        return offset + sum(terms.values(), np.zeros_like(offset))

    def predict(self, data) -> np.ndarray:
        """Each row's mean response μ(s) (``gdmix.losses``): P(label = 1) = σ(s) for the
        logistic task, s for linear, the rate e^s for poisson."""
        return losses.of(self.config.task).mean(self.decision_function(data))

    def predict_proba(self, data) -> np.ndarray:
        """(n, 2): P(label = 0) and P(label = 1) = σ(s) of each row, scikit-learn's layout
        (the logistic task only: the others have ``predict``)."""
        if self.config.task != "logistic":
            raise ValueError(f"predict_proba: task {self.config.task!r} has no class probabilities; "
                             "use predict (the mean response)")
        p = losses.of("logistic").mean(self.decision_function(data))
        return np.column_stack([1.0 - p, p])

    def decompose(self, data, as_arrow: bool = False):
        """Per-coordinate breakdown: ``uid``, ``offset``, one column per coordinate (its
        term of s; 0 for an entity without a model), ``score`` (their sum) and
        the mean response (``probability`` for the logistic task, ``prediction`` for the
        others); a pandas DataFrame (``as_arrow``: a pyarrow Table)."""
        rows, offset, terms = self._terms(data)
        s = offset + sum(terms.values(), np.zeros_like(offset))
        uid = rows.column(self.config.data.columns.uid).cast(pa.int64())
        from gdmix.models import mean_column

        task = self.config.task
        table = pa.table({schema.UID: uid, "offset": offset, **terms, schema.SCORE: s,
                          mean_column(task): losses.of(task).mean(s)})
        return table if as_arrow else table.to_pandas()
