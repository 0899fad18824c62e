"""The correctness reference: the whole objective of docs/design.md §1 solved jointly.

GLMix's objective is one convex problem, the task's GLM (logistic, linear or Poisson
regression, ``gdmix.losses``) on entity-crossed
features: the fixed-effect block [1 | x_i] for every row, plus, for each random-effect
coordinate c and each active entity e (≥ min_samples training rows), a block [1 | z_{c,i}]
that is non-zero only on e's rows (restricted to the features occurring in those rows).
With θ the stacked coefficients, X the crossed design and p the per-column L2 weights
(λ of the column's coordinate; 0 for an unpenalised intercept):

    F(θ) = Σ_i w_i [log(1 + exp(s_i)) − y_i s_i] + ½ Σ_k p_k θ_k²,   s = o + X θ,
    ∇F   = Xᵀ (w ∘ (σ(s) − y)) + p ∘ θ,     ∇²F v = Xᵀ (w σ (1−σ) ∘ X v) + p ∘ v.

With a prior the penalty is ½ Σ_k p_k (θ_k − c_k)²: ``penalties(coordinate, model_ids,
features) -> (p, c)`` gives each column's weight and centre (features −1: intercepts; the
run passes ``gdmix.priors.penalty_terms``, which this layer cannot import).

Solved with scipy's trust-region Newton-CG (Hessian-vector products), then polished by
Newton steps (``joint_newton.minimise``: block-Jacobi preconditioned CG to a near-exact
direction, an exact line search) until ‖∇F‖∞ ≤ tol·Σw. Meant for problems small
enough to solve jointly: the blockwise trainer's objective must come within a stated
relative gap of this one.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import scipy.optimize as so
import scipy.sparse as sp

from gdmix import joint_newton, layout, losses, schema, sparse, storage
from gdmix.config import Config, Coordinate


@dataclass
class FixedModel:
    intercept: float
    coefficients: np.ndarray  # dense, over the bag's feature index


@dataclass
class EntityModel:
    intercept: float
    coefficients: dict[int, float] = field(default_factory=dict)  # bag feature index -> value


@dataclass
class JointSolution:
    objective: float
    # fixed effect: FixedModel; random effect: {entity id: EntityModel}
    coefficients: dict[str, object]
    gradient_norm: float  # ‖∇F‖∞ at the solution
    iterations: int


def n_features(workdir: str, bag: str, rows: pa.Table | None = None) -> int:
    """The size of a bag's feature index (its file, else the largest index seen + 1)."""
    url = layout.feature_index(workdir, bag)
    if storage.exists(url):
        return storage.read_table(url, columns=["index"]).num_rows
    idx = pc.list_flatten(rows.column(schema.bag_indices(bag)))
    return 0 if len(idx) == 0 else int(pc.max(idx).as_py()) + 1


def _entity_codes(rows: pa.Table, column: str) -> tuple[np.ndarray, list[str]]:
    """Per row, the position of its entity id (as a string) among the distinct ids."""
    enc = pc.cast(rows.column(column), pa.string()).combine_chunks().dictionary_encode()
    return enc.indices.to_numpy(zero_copy_only=False).astype(np.int64), enc.dictionary.to_pylist()


@dataclass
class _Block:
    coordinate: Coordinate
    x: sp.csr_matrix
    penalty: np.ndarray
    n_features: int
    # random effects: the active entities' ids, and each column's (entity, feature) (-1 = intercept)
    entity_ids: list[str] | None = None
    col_entity: np.ndarray | None = None
    col_feature: np.ndarray | None = None
    centre: np.ndarray | None = None  # per column: the prior's mean (0 without one)


def _fixed_block(coord: Coordinate, rows: pa.Table, nf: int) -> _Block:
    csr = sparse.from_table(rows, schema.bag_indices(coord.feature_bag), schema.bag_values(coord.feature_bag))
    n = csr.n_rows
    x = sp.hstack([sp.csr_matrix(np.ones((n, 1))), csr.matrix(nf)], format="csr")
    pen = np.full(nf + 1, coord.l2)
    pen[0] = coord.l2 if coord.regularize_intercept else 0.0
    return _Block(coord, x, pen, nf)


def _random_block(coord: Coordinate, rows: pa.Table, nf: int) -> _Block:
    csr = sparse.from_table(rows, schema.bag_indices(coord.feature_bag), schema.bag_values(coord.feature_bag))
    n = csr.n_rows
    code, ids = _entity_codes(rows, coord.entity)
    counts = np.bincount(code, minlength=len(ids))
    active = counts >= coord.min_samples
    rank = np.cumsum(active) - 1  # active entity -> its intercept column
    n_act = int(active.sum())
    row_act = active[code]
    # intercept columns
    r_i = np.flatnonzero(row_act)
    c_i = rank[code[r_i]]
    # feature columns: one per distinct (active entity, feature) pair
    nz_row = csr.row_ids()
    keep = row_act[nz_row]
    nz_row, nz_feat, nz_val = nz_row[keep], csr.indices[keep].astype(np.int64), csr.values[keep]
    keys = rank[code[nz_row]] * max(nf, 1) + nz_feat
    uniq, inv = np.unique(keys, return_inverse=True)
    cols = np.concatenate([c_i, n_act + inv])
    data = np.concatenate([np.ones(len(r_i)), nz_val])
    rr = np.concatenate([r_i, nz_row])
    x = sp.csr_matrix((data, (rr, cols)), shape=(n, n_act + len(uniq)))
    pen = np.full(n_act + len(uniq), coord.l2)
    if not coord.regularize_intercept:
        pen[:n_act] = 0.0
    active_ids = [ids[i] for i in np.flatnonzero(active)]
    col_entity = np.concatenate([np.arange(n_act), uniq // max(nf, 1)])
    col_feature = np.concatenate([np.full(n_act, -1), uniq % max(nf, 1)])
    return _Block(coord, x, pen, nf, active_ids, col_entity, col_feature)


def _blocks(cfg: Config, workdir: str, rows: pa.Table, penalties=None,
            coordinates: tuple[str, ...] | None = None) -> list[_Block]:
    """The crossed design's blocks, one per coordinate (``coordinates``: only those, in config order)."""
    out = []
    for c in cfg.coordinates:
        if coordinates is not None and c.name not in coordinates:
            continue
        nf = n_features(workdir, c.feature_bag, rows)
        b = _fixed_block(c, rows, nf) if c.is_fixed_effect else _random_block(c, rows, nf)
        b.centre = np.zeros(len(b.penalty))
        if penalties is not None:
            if c.is_fixed_effect:
                ids, feats = [schema.FIXED_EFFECT_MODEL_ID] * (nf + 1), np.arange(-1, nf)
            else:
                ids, feats = [b.entity_ids[e] for e in b.col_entity], b.col_feature
            b.penalty, b.centre = (np.asarray(a, float) for a in penalties(c, ids, np.asarray(feats, np.int64)))
        out.append(b)
    return out


def _read_train(workdir: str) -> pa.Table:
    return storage.read_table(layout.prepared(workdir, "train"))


def _col(rows: pa.Table, name: str) -> np.ndarray:
    return rows.column(name).to_numpy().astype(np.float64)


def _split(theta: np.ndarray, blocks: list[_Block]) -> dict[str, object]:
    out, at = {}, 0
    for b in blocks:
        part = theta[at:at + b.x.shape[1]]
        at += b.x.shape[1]
        if b.coordinate.is_fixed_effect:
            out[b.coordinate.name] = FixedModel(float(part[0]), part[1:].copy())
            continue
        models = {eid: EntityModel(float(part[i])) for i, eid in enumerate(b.entity_ids)}
        for k in range(len(b.entity_ids), len(part)):
            models[b.entity_ids[b.col_entity[k]]].coefficients[int(b.col_feature[k])] = float(part[k])
        out[b.coordinate.name] = models
    return out


def _feature_keys(b: _Block) -> np.ndarray:
    """A random block's feature columns as sorted keys entity rank · n_features + feature."""
    n_act = len(b.entity_ids)
    return b.col_entity[n_act:] * max(b.n_features, 1) + b.col_feature[n_act:]


def _ranks(b: _Block, ids: list[str]) -> np.ndarray:
    """Each id's position among the block's active entities (−1: none)."""
    at = {eid: i for i, eid in enumerate(b.entity_ids)}
    return np.array([at.get(e, -1) for e in ids], np.int64)


def design(b: _Block, rows: pa.Table) -> sp.csr_matrix:
    """The block's columns on other ``rows`` (the validation split): an entity's columns
    only for the features its model has, nothing for entities without a model."""
    csr = sparse.from_table(rows, schema.bag_indices(b.coordinate.feature_bag),
                            schema.bag_values(b.coordinate.feature_bag))
    n, nf = csr.n_rows, b.n_features
    if b.coordinate.is_fixed_effect:
        keep = csr.indices < nf
        x = sp.csr_matrix((csr.values[keep], (csr.row_ids()[keep], csr.indices[keep])), shape=(n, nf))
        return sp.hstack([sp.csr_matrix(np.ones((n, 1))), x], format="csr")
    code, ids = _entity_codes(rows, b.coordinate.entity)
    rank = _ranks(b, ids)[code]
    n_act = len(b.entity_ids)
    r_i = np.flatnonzero(rank >= 0)
    nz_row = csr.row_ids()
    q = rank[nz_row] * max(nf, 1) + csr.indices.astype(np.int64)
    keys = _feature_keys(b)
    at = np.minimum(np.searchsorted(keys, q), max(len(keys) - 1, 0))
    hit = (rank[nz_row] >= 0) & (len(keys) > 0)
    hit[hit] = keys[at[hit]] == q[hit]
    rr = np.concatenate([r_i, nz_row[hit]])
    cols = np.concatenate([rank[r_i], n_act + at[hit]])
    data = np.concatenate([np.ones(len(r_i)), csr.values[hit]])
    return sp.csr_matrix((data, (rr, cols)), shape=(n, b.x.shape[1]))


def theta_of(b: _Block, table: pa.Table, source: str) -> np.ndarray:
    """The block's coefficients from a coefficients table (schema.COEFFICIENTS) read from
    ``source``; a model or coefficient with no column in the block is an error naming it."""
    theta = np.zeros(b.x.shape[1])
    icp = table.column(schema.INTERCEPT).to_numpy().astype(np.float64)
    csr = sparse.from_table(table, schema.INDICES, schema.VALUES)
    nf = b.n_features
    if b.coordinate.is_fixed_effect:
        if table.num_rows != 1:
            raise ValueError(f"{source}: expected one fixed-effect model, found {table.num_rows}")
        if len(csr.indices) and int(csr.indices.max()) >= nf:
            raise ValueError(f"{source}: feature index {int(csr.indices.max())} beyond the bag's {nf} features")
        theta[0] = icp[0]
        theta[1 + csr.indices.astype(np.int64)] = csr.values
        return theta
    ids = table.column(schema.MODEL_ID).to_pylist()
    rank = _ranks(b, ids)
    if (rank < 0).any():
        bad = ids[int(np.flatnonzero(rank < 0)[0])]
        raise ValueError(f"{source}: a model for entity {bad!r}, which has fewer than min_samples training rows")
    theta[rank] = icp
    keys = _feature_keys(b)
    q = rank[csr.row_ids()] * max(nf, 1) + csr.indices.astype(np.int64)
    at = np.minimum(np.searchsorted(keys, q), max(len(keys) - 1, 0))
    miss = np.flatnonzero((len(keys) == 0) | (keys[at] != q)) if len(q) else np.zeros(0, np.int64)
    if len(miss):
        i = int(miss[0])
        raise ValueError(f"{source}: entity {ids[int(csr.row_ids()[i])]!r} has feature {int(csr.indices[i])}, "
                         "which none of its training rows has")
    theta[len(b.entity_ids) + at] = csr.values
    return theta


def table_of(b: _Block, theta: np.ndarray) -> pa.Table:
    """The block's coefficients as a coefficients table (schema.COEFFICIENTS): the fixed
    effect dense over its bag, an entity every feature of its rows."""
    if b.coordinate.is_fixed_effect:
        ptr, idx, vals, ids, icp = np.array([0, b.n_features]), np.arange(b.n_features), theta[1:], \
            [schema.FIXED_EFFECT_MODEL_ID], theta[:1]
    else:
        n_act = len(b.entity_ids)
        ptr = np.concatenate([[0], np.cumsum(np.bincount(b.col_entity[n_act:], minlength=n_act))])
        idx, vals, ids, icp = b.col_feature[n_act:], theta[n_act:], b.entity_ids, theta[:n_act]
    il, vl = sparse.to_arrow_lists(ptr, np.asarray(idx, np.int32), np.asarray(vals, np.float64))
    return pa.Table.from_arrays([pa.array(ids, pa.string()), pa.array(icp, pa.float64()), il, vl],
                                schema=schema.COEFFICIENTS)


def problem(rows: pa.Table, blocks: list[_Block], offset: np.ndarray | None = None,
            loss: losses.Loss | None = None) -> joint_newton.Problem:
    """F over ``blocks`` on the training ``rows`` (the objective, gradient and Hessian-vector
    products of ``gdmix.joint_newton``); ``offset``: added to the rows' own (the scores of
    coordinates held fixed); ``loss``: the task's (``gdmix.losses``; default logistic)."""
    o = _col(rows, schema.OFFSET)
    return joint_newton.Problem([b.x for b in blocks], [b.penalty for b in blocks], [b.centre for b in blocks],
                                _col(rows, schema.LABEL), _col(rows, schema.WEIGHT),
                                o if offset is None else o + offset, loss or losses.of(losses.LOGISTIC))


def joint_optimum(cfg: Config, workdir: str, tol: float = 1e-12, penalties=None) -> JointSolution:
    """Solve the objective of docs/design.md §1 jointly on the prepared training rows
    (``penalties``: per-column weights and centres, a prior; see the module docstring)."""
    rows = _read_train(workdir)
    blocks = _blocks(cfg, workdir, rows, penalties)
    prob = problem(rows, blocks, loss=losses.of(cfg.task))
    w, pen = prob.w, prob.pen

    def fg(theta):
        s = prob.scores(theta)
        return prob.value(theta, s), prob.gradient(theta, s)

    def hessp(theta, v):
        return prob.apply_t(prob.loss.curvature(prob.scores(theta), w) * prob.apply(v)) + pen * v

    gtol = tol * max(1.0, float(w.sum()))
    theta = prob.ctr.copy()  # the prior's means (0 without one)
    res = so.minimize(fg, theta, jac=True, hessp=hessp, method="trust-ncg",
                      options={"gtol": gtol, "maxiter": 10_000})
    # Polish by Newton's method (block-Jacobi preconditioned CG, exact line search):
    # trust-ncg's CG can stall short of a 1e-12 gradient, and a sparse LU of the crossed
    # Hessian fills in (minutes and gigabytes on MovieLens' 61k columns).
    theta, steps = joint_newton.minimise(prob, res.x, gtol=gtol)
    iters = int(res.nit) + len(steps)
    f, g = fg(theta)
    return JointSolution(f, _split(theta, blocks), float(np.max(np.abs(g), initial=0.0)), iters)


def objective(cfg: Config, workdir: str, coefficients_by_coordinate: dict[str, object], penalties=None) -> float:
    """F at the given coefficients (same shapes as ``JointSolution.coefficients``).

    Entities without a model score 0 (their rows use the other coordinates alone).
    ``penalties``: as for ``joint_optimum`` (a prior).
    """
    rows = _read_train(workdir)
    y, w, o = _col(rows, schema.LABEL), _col(rows, schema.WEIGHT), _col(rows, schema.OFFSET)
    s = o.copy()
    penalty = 0.0
    for c in cfg.coordinates:
        model = coefficients_by_coordinate.get(c.name)
        if model is None:
            continue
        csr = sparse.from_table(rows, schema.bag_indices(c.feature_bag), schema.bag_values(c.feature_bag))
        nf = n_features(workdir, c.feature_bag, rows)
        if c.is_fixed_effect:
            coef = np.zeros(nf)
            coef[:len(model.coefficients)] = model.coefficients
            s += model.intercept + csr.dot(coef)
            if penalties is not None:
                p, ctr = penalties(c, [schema.FIXED_EFFECT_MODEL_ID] * (nf + 1), np.arange(-1, nf))
                dev = np.concatenate([[model.intercept], coef]) - ctr
                penalty += float(np.sum(p * dev * dev))
                continue
            penalty += c.l2 * (float(coef @ coef) + (model.intercept ** 2 if c.regularize_intercept else 0.0))
            continue
        code, ids = _entity_codes(rows, c.entity)
        pos = np.array([i for i, eid in enumerate(ids) if eid in model], np.int64)
        has = np.zeros(len(ids), bool)
        has[pos] = True
        intercepts = np.zeros(len(ids))
        key_parts, val_parts = [], []
        for i in pos:
            m = model[ids[i]]
            intercepts[i] = m.intercept
            feats = np.fromiter(m.coefficients.keys(), np.int64, len(m.coefficients))
            key_parts.append(i * max(nf, 1) + feats)
            val_parts.append(np.fromiter(m.coefficients.values(), np.float64, len(m.coefficients)))
        keys = np.concatenate(key_parts) if key_parts else np.zeros(0, np.int64)
        vals = np.concatenate(val_parts) if val_parts else np.zeros(0)
        order = np.argsort(keys)
        keys, vals = keys[order], vals[order]
        nz_row = csr.row_ids()
        q = code[nz_row] * max(nf, 1) + csr.indices.astype(np.int64)
        at = np.searchsorted(keys, q)
        hit = at < len(keys)
        hit[hit] = keys[at[hit]] == q[hit]
        contrib = np.zeros(len(q))
        contrib[hit] = csr.values[hit] * vals[at[hit]]
        s += intercepts[code] * has[code] + np.bincount(nz_row, weights=contrib, minlength=len(s))
        if penalties is not None:
            owner = [ids[int(k) // max(nf, 1)] for k in keys]
            p_icp, c_icp = penalties(c, [ids[i] for i in pos], np.full(len(pos), -1))
            p_val, c_val = penalties(c, owner, keys % max(nf, 1))
            penalty += float(np.sum(p_icp * (intercepts[pos] - c_icp) ** 2)) + float(np.sum(p_val * (vals - c_val) ** 2))
            continue
        penalty += c.l2 * (float(vals @ vals) + (float(intercepts @ intercepts) if c.regularize_intercept else 0.0))
    return losses.of(cfg.task).loss(s, y, w) + 0.5 * penalty


def coefficients_from_tables(cfg: Config, workdir: str, tables: dict[str, pa.Table]) -> dict[str, object]:
    """Coefficient tables (schema.COEFFICIENTS) in the shapes ``objective`` takes."""
    out = {}
    for name, t in tables.items():
        c = cfg.coordinate(name)
        ids = t.column(schema.MODEL_ID).to_pylist()
        icp = t.column(schema.INTERCEPT).to_numpy()
        csr = sparse.from_table(t, schema.INDICES, schema.VALUES)
        if c.is_fixed_effect:
            nf = n_features(workdir, c.feature_bag, _read_train(workdir)) if t.num_rows else 0
            coef = np.zeros(nf)
            coef[csr.indices[csr.indptr[0]:csr.indptr[1]]] = csr.values[csr.indptr[0]:csr.indptr[1]]
            out[name] = FixedModel(float(icp[0]), coef)
            continue
        out[name] = {eid: EntityModel(float(icp[i]), dict(zip(
            csr.indices[csr.indptr[i]:csr.indptr[i + 1]].tolist(),
            csr.values[csr.indptr[i]:csr.indptr[i + 1]].tolist()))) for i, eid in enumerate(ids)}
    return out
