"""The joint Newton step at the end of a pass (docs/design.md §2.5): its inputs read from the
work directory, the step taken by ``gdmix.joint_newton``, its result written as the
coordinates' own steps write theirs.

At θ (the latest coefficients of every coordinate ``plan.accelerated`` names; every other
trained coordinate's training score added to the offsets), the crossed design of
``gdmix.joint`` on the prepared training rows gives F, its gradient and Hessian-vector
products; ``joint_newton.step`` moves θ along the block-Jacobi preconditioned Newton
direction by an exact line search, or keeps it when F would not decrease. The step then
writes, under ``iter-<k>/_joint/``, each moved coordinate's coefficients
(``layout.coefficients``) and scores of both splits (``layout.scores``), so the next
pass's partitions, warm starts and the final export read them (``plan.writes``).

One process, numpy/scipy over the prepared rows (pyarrow, no Spark). Every piece is a
per-coordinate product (``joint_newton.Problem.apply``/``apply_t``), so at scale each runs
where its coordinate's rows are, summed by an all-reduce.
"""
from __future__ import annotations

import time
from dataclasses import dataclass

import numpy as np
import pyarrow as pa

from gdmix import joint, joint_newton, layout, losses, plan, priors, schema, storage
from gdmix.config import Config
from gdmix.plan import Step


def _penalties(cfg: Config, workdir: str):
    """Per-column penalty weights and centres (a prior), or None for plain L2."""
    if cfg.prior is None:
        return None
    cache = {c.name: priors.prior_models(cfg, workdir, c) for c in cfg.coordinates}
    return lambda c, ids, feats: priors.penalty_terms(c, cache[c.name], cfg.prior.weight, ids, feats)


def _aligned_scores(workdir: str, s: Step, coordinate: str, split: str, uid: np.ndarray) -> np.ndarray:
    """A coordinate's score file, in the order of the prepared split's ``uid``; a row without
    exactly one score is an error naming the file."""
    url = layout.scores(workdir, s.iteration, s.coordinate, coordinate, split)
    t = storage.read_table(url, schema=schema.SCORES)
    su = t.column(schema.UID).to_numpy()
    order = np.argsort(su, kind="stable")
    su, sv = su[order], t.column(schema.SCORE).to_numpy().astype(np.float64)[order]
    at = np.minimum(np.searchsorted(su, uid), max(len(su) - 1, 0))
    found = su[at] == uid if len(su) else np.zeros(len(uid), bool)
    if len(su) != len(uid) or not found.all():
        missing = uid[~found]
        raise ValueError(f"{url}: {t.num_rows} scores for {len(uid)} {split} rows"
                         + (f"; none for uid {missing[0]}" if len(missing) else "")
                         + f" (redo {s}: gdmix train --iteration {s.iteration} --coordinate {s.coordinate})")
    return sv[at]


def _write_scores(workdir: str, step: Step, coordinate: str, split: str, uid: np.ndarray, score: np.ndarray):
    table = pa.Table.from_arrays([pa.array(uid, pa.int64()), pa.array(score, pa.float64())], schema=schema.SCORES)
    storage.write_table(storage.join(layout.scores(workdir, step.iteration, step.coordinate, coordinate, split),
                                     "part-00000.parquet"), table)


def columns(cfg: Config, coordinates: tuple[str, ...]) -> list[str]:
    """The prepared columns F over ``coordinates`` reads: the rows' own, each one's bag and entity."""
    out = [schema.UID, schema.LABEL, schema.WEIGHT, schema.OFFSET]
    for c in cfg.coordinates:
        if c.name in coordinates:
            out += [schema.bag_indices(c.feature_bag), schema.bag_values(c.feature_bag)]
            out += [] if c.is_fixed_effect else [c.entity]
    return list(dict.fromkeys(out))


@dataclass
class JointPoint:
    """F over the moved coordinates at a state of the run: its problem (every held
    coordinate's training score in the offsets), the blocks and the stacked θ."""
    uid: np.ndarray
    held: list[str]
    blocks: list
    problem: joint_newton.Problem
    theta: np.ndarray


def load(cfg: Config, workdir: str, state: dict[str, Step], moved: tuple[str, ...]) -> JointPoint:
    """F and θ at ``state`` (``plan.state``: each coordinate's latest step) over ``moved``."""
    missing = [c for c in moved if c not in state]
    if missing:
        raise ValueError(f"{missing[0]} has not been trained yet")
    train = storage.read_table(layout.prepared(workdir, "train"), columns=columns(cfg, moved))
    uid = train.column(schema.UID).to_numpy()
    held = [d for d in state if d not in moved]  # their scores are offsets
    offset = np.zeros(train.num_rows)
    for d in held:
        offset += _aligned_scores(workdir, state[d], d, "train", uid)
    blocks = joint._blocks(cfg, workdir, train, _penalties(cfg, workdir), coordinates=moved)
    thetas = []
    for b in blocks:
        s = state[b.coordinate.name]
        url = layout.coefficients(workdir, s.iteration, s.coordinate, b.coordinate.name)
        thetas.append(joint.theta_of(b, storage.read_table(url, schema=schema.COEFFICIENTS), url))
    return JointPoint(uid, held, blocks, joint.problem(train, blocks, offset, losses.of(cfg.task)),
                      np.concatenate(thetas))


def run(cfg: Config, workdir: str, step: Step) -> dict:
    """Take the joint step ``step`` (``plan.is_joint``); returns its done-marker record."""
    t0 = time.time()
    moved = plan.accelerated(cfg)
    if not plan.is_joint(step) or not moved:
        raise ValueError(f"{step}: not a joint step of this run (acceleration: {cfg.acceleration})")
    try:
        point = load(cfg, workdir, plan.state(cfg, step), moved)
    except ValueError as e:
        raise ValueError(f"{step}: {e}") from None
    uid, held, blocks, problem = point.uid, point.held, point.blocks, point.problem
    t_read = time.time() - t0
    res = joint_newton.step(problem, point.theta)

    val = storage.read_table(layout.prepared(workdir, "validation"), columns=columns(cfg, moved))
    val_uid = val.column(schema.UID).to_numpy()
    for b, theta in zip(blocks, problem.parts(res.theta)):
        name = b.coordinate.name
        storage.write_table(storage.join(layout.coefficients(workdir, step.iteration, step.coordinate, name),
                                         "part-00000.parquet"), joint.table_of(b, theta))
        _write_scores(workdir, step, name, "train", uid, b.x @ theta)
        _write_scores(workdir, step, name, "validation", val_uid, joint.design(b, val) @ theta)
    outcome = (f"Newton step of length {res.step_length:.4g}" if res.step_length > 0
               else "no step lowered the objective: the pass's point kept")
    info = {"coordinates": list(moved), "held": held, "objective_before": res.objective_before,
            "objective": res.objective_after, "step_length": res.step_length,
            "cg_iterations": res.cg_iterations, "iterations": res.cg_iterations, "cg_residual": res.cg_residual,
            "gradient_norm": res.gradient_norm, "rows": len(uid), "outcome": outcome,
            "read_seconds": round(t_read, 3), "seconds": round(time.time() - t0, 3)}
    storage.mark_done(layout.step_dir(workdir, step.iteration, step.coordinate), "train", info)
    return info
