"""The re-centring step of a random-effect step that follows a trained linear fixed effect
(docs/design.md §2.3): its inputs gathered from the work directory (the fixed effect's
latest model, the shared features, the priors), the step solved by ``gdmix.shift``, and
its result applied to both coordinates' models and scores."""
from __future__ import annotations

import numpy as np
import pyarrow as pa

from gdmix import l2, layout, plan, priors, schema, shift, sparse, storage
from gdmix.config import Config
from gdmix.plan import Step
from gdmix.random_effect.scipy_solver import Models
from gdmix.random_effect.shards import column, models_from_table, models_table, variances_from_table


def n_features(workdir: str, bag: str) -> int:
    return storage.read_table(layout.feature_index(workdir, bag), columns=["index"]).num_rows


class FixedEffectShift:
    """The shift's inputs gathered from the work directory, and its result."""

    def __init__(self, cfg: Config, workdir: str, step: Step, models: Models, ids: pa.Array):
        coord, fe = cfg.coordinate(step.coordinate), cfg.fixed_effect
        self.fe, self.models, self.ids = fe, models, ids
        self.weight = cfg.prior.weight if cfg.prior else 1.0
        self.task = cfg.task
        self.fe_prior = priors.prior_models(cfg, workdir, fe)
        self.prior = priors.prior_models(cfg, workdir, coord)
        self.coord = coord
        fe_step = plan.latest(cfg, fe.name, step)
        fe_table = storage.read_table(layout.coefficients(workdir, fe_step.iteration, fe_step.coordinate, fe.name))
        if fe_table.num_rows != 1:
            raise ValueError(f"{fe.name}: expected one fixed-effect model, found {fe_table.num_rows}")
        self.n_random = n_features(workdir, coord.feature_bag)
        fe_models = models_from_table(fe_table)
        self.fe_var = variances_from_table(fe_table)  # kept through the shift (see fixed_table)
        self.fe_icp = float(fe_models.intercept[0])
        self.fe_coef = np.zeros(n_features(workdir, fe.feature_bag))
        self.fe_coef[fe_models.indices] = fe_models.values
        self.fe_stored = np.zeros(len(self.fe_coef), bool)
        self.fe_stored[fe_models.indices] = True
        self._fe_indices = fe_models.indices
        same = cfg.bag(fe.feature_bag).shares_values_with(cfg.bag(coord.feature_bag))
        self.fixed_idx, self.random_idx = shift.shared_features(
            storage.read_table(layout.feature_index(workdir, fe.feature_bag)),
            storage.read_table(layout.feature_index(workdir, coord.feature_bag)), same)
        self.direction = shift.directions(self.n_random, self.random_idx)
        ones = np.ones(len(self.random_idx))
        self.beta = np.concatenate([[self.fe_icp], self.fe_coef[self.fixed_idx]])
        self.pen_fixed = fe.l2 * np.concatenate([[1.0 if fe.regularize_intercept else 0.0], ones])
        self.pen_random = l2.l2_of(cfg, workdir, step, coord.name).weights(  # λ_j per direction (l2: auto)
            coord, np.concatenate([[l2.INTERCEPT], self.random_idx]))
        self.t = np.zeros(len(self.beta))

    def solve(self, passive_rows: list[pa.Table]) -> None:
        """t, with the rows of entities without a model (their scores move with t)."""
        rows = pa.concat_tables(passive_rows) if passive_rows else None
        passive = None
        if rows is not None and rows.num_rows:
            passive = (sparse.from_table(rows, schema.INDICES, schema.VALUES), column(rows, schema.OFFSET),
                       column(rows, schema.LABEL), column(rows, schema.WEIGHT))
        m = self.models
        weighted = None
        if self.fe_prior is not None or self.prior is not None:
            # per-coefficient weights and centres (a prior): the shift stays exact (gdmix.shift)
            fe_id = pa.array([schema.FIXED_EFFECT_MODEL_ID] * len(self.beta))
            fixed_feats = np.concatenate([[priors.INTERCEPT], self.fixed_idx])
            self.pen_fixed, fixed_centre = priors.penalty_terms(self.fe, self.fe_prior, self.weight, fe_id,
                                                                fixed_feats)
            owners = self.ids.take(pa.array(np.repeat(np.arange(m.n_models), np.diff(m.ptr))))
            icp_w, icp_c = priors.penalty_terms(self.coord, self.prior, self.weight, self.ids,
                                                np.full(m.n_models, priors.INTERCEPT))
            val_w, val_c = priors.penalty_terms(self.coord, self.prior, self.weight, owners, m.indices)
            weighted = (fixed_centre, icp_w, icp_c, val_w, val_c)
        p = shift.build_problem(m.intercept, m.indices, m.values, self.direction, self.beta,
                                self.pen_fixed, self.pen_random, passive, weighted, self.task)
        self.t = shift.solve(p)
        self.decrease = p.value(np.zeros(len(self.t))) - p.value(self.t)
        self.passive_rows = p.n_passive

    def apply(self) -> Models:
        m = self.models
        icp, values = shift.apply(self.t, m.intercept, m.indices, m.values, self.direction)
        self.fe_icp += self.t[0]
        self.fe_coef[self.fixed_idx] += self.t[1:]
        self.fe_stored[self.fixed_idx] = True
        self.t_random = np.zeros(self.n_random)  # per random-bag feature: the fixed score's change
        self.t_random[self.random_idx] = self.t[1:]
        return Models(icp, m.ptr, m.indices, values)

    def fixed_table(self) -> pa.Table:
        """The shifted fixed effect. Its variances are carried as they were: exact without
        passive rows (no training score moves, so its Hessian does not), else those of its
        own step (the passive rows' curvature moved with the shift)."""
        idx = np.flatnonzero(self.fe_stored)
        var = None
        if self.fe_var is not None:
            fe_var = np.full(len(self.fe_coef), np.nan)
            fe_var[self._fe_indices] = self.fe_var[1]
            var = (self.fe_var[0], fe_var[idx])
        return models_table(pa.array([schema.FIXED_EFFECT_MODEL_ID]),
                            Models(np.array([self.fe_icp]), np.array([0, len(idx)], np.int64),
                                   idx.astype(np.int32), self.fe_coef[idx]), var)

    def penalty(self) -> float:
        """The fixed effect's penalty term after the shift (with its prior, if any)."""
        return priors.penalty(self.fe, self.fe_prior, self.weight, self.fixed_table())
