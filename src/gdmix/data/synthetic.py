"""A synthetic GLMix problem with known true coefficients, for tests and benchmarks.

The model that draws each label (``task``: logistic y ~ Bernoulli(σ(logit)); linear
y ~ N(logit, 1); poisson y ~ Poisson(e^logit)):

    logit = offset + b0 + x_g·β_g + x_u·β_u                  (fixed effect)
            + a_user + x_u·α_user                           (per-user random effect)
            + a_item + x_i·α_item                           (per-item random effect)

Features (each present in a row with probability ``presence``, values N(0, 1)):
- ``global_features``: name-term-value list holding the global features ("g", "<j>") AND
  the user features ("u", "<j>"): the global bag reads it;
- ``user_features``: the user features alone (a subset of ``global_features``, same
  name/term/value);
- ``item_features``: the item features ("i", "<j>").
The suggested per-user bag reads ``global_features`` too, so it SHARES features with the
global bag (bags share features only when they read the same column, see
``FeatureBag.source``); its true slopes on the "g" features are 0. With ``ntv=False``
the same features are plain columns ``g_<j>``, ``u_<j>``, ``i_<j>`` (null when absent).

Entities: ``user_id`` int64 and ``item_id`` string ("item<j>"), with skewed activity:
entity k is drawn with probability proportional to (k+1)^-0.8 (entity 0 is the heaviest).
Optional ``weight`` (0.5, 1 or 2) and ``offset`` (N(0, 0.3²), included in the logit).

Generation is vectorised and chunked (one Parquet file per chunk), and each chunk has
its own seeded random stream, so 10M rows take about a minute and never sit in memory
at once.
"""
from __future__ import annotations

import argparse
import json
import os

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from gdmix import schema

SKEW = 0.8  # activity ~ (rank + 1)^-SKEW


def _features(prefix: str, n: int, ntv: bool) -> list[tuple[str, str]]:
    return [(prefix, str(j)) for j in range(n)] if ntv else [(f"{prefix}_{j}", "") for j in range(n)]


def _entity_probabilities(n: int) -> np.ndarray:
    p = (np.arange(n) + 1.0) ** -SKEW
    return p / p.sum()


def _truth(rng, n_global, n_user_features, n_item_features, n_users, n_items) -> dict:
    return {
        "intercept": float(rng.normal(-0.3, 0.2)),
        "beta_g": rng.normal(0, 0.5, n_global),
        "beta_u": rng.normal(0, 0.5, n_user_features),
        "user_intercept": rng.normal(0, 0.7, n_users),
        "user_slopes": rng.normal(0, 0.4, (n_users, n_user_features)),
        "item_intercept": rng.normal(0, 0.7, n_items),
        "item_slopes": rng.normal(0, 0.4, (n_items, n_item_features)),
    }


def _ntv_column(x: np.ndarray, present: np.ndarray, feats: list[tuple[str, str]]) -> pa.Array:
    """Dense values + presence mask -> list<struct<name, term, value>> (row-major order)."""
    rows, cols = np.nonzero(present)
    offsets = np.zeros(len(x) + 1, dtype=np.int32)
    np.cumsum(present.sum(axis=1), out=offsets[1:])
    names = pa.array([f[0] for f in feats], pa.string()).take(pa.array(cols))
    terms = pa.array([f[1] for f in feats], pa.string()).take(pa.array(cols))
    entries = pa.StructArray.from_arrays([names, terms, pa.array(x[rows, cols])],
                                         fields=list(schema.NTV.value_type))
    return pa.ListArray.from_arrays(pa.array(offsets), entries, type=schema.NTV)


def _labels(rng, logit: np.ndarray, task: str) -> np.ndarray:
    """Each row's label drawn from the task's distribution with natural parameter ``logit``."""
    if task == "linear":
        return logit + rng.standard_normal(len(logit))
    if task == "poisson":
        return rng.poisson(np.exp(logit)).astype(np.float64)
    return (rng.random(len(logit)) < 1.0 / (1.0 + np.exp(-logit))).astype(np.float64)


def _chunk(rng, start, n, truth, feats, p_users, p_items, presence, ntv, weight, offset,
           task: str = "logistic") -> pa.Table:
    n_g, n_u, n_i = len(truth["beta_g"]), len(truth["beta_u"]), truth["item_slopes"].shape[1]
    users = rng.choice(len(p_users), size=n, p=p_users)
    items = rng.choice(len(p_items), size=n, p=p_items)
    x = rng.standard_normal((n, n_g + n_u + n_i))
    present = rng.random((n, n_g + n_u + n_i)) < presence
    xm = np.where(present, x, 0.0)
    xg, xu, xi = xm[:, :n_g], xm[:, n_g:n_g + n_u], xm[:, n_g + n_u:]
    logit = (truth["intercept"] + xg @ truth["beta_g"] + xu @ truth["beta_u"]
             + truth["user_intercept"][users] + np.einsum("ij,ij->i", xu, truth["user_slopes"][users])
             + truth["item_intercept"][items] + np.einsum("ij,ij->i", xi, truth["item_slopes"][items]))
    cols = {"uid": pa.array(np.arange(start, start + n, dtype=np.int64))}
    if offset:
        off = rng.normal(0, 0.3, n)
        logit += off
    label = _labels(rng, logit, task)
    cols["label"] = pa.array(label)
    if weight:
        cols["weight"] = pa.array(rng.choice(np.array([0.5, 1.0, 2.0]), size=n))
    if offset:
        cols["offset"] = pa.array(off)
    cols["user_id"] = pa.array(users.astype(np.int64))
    cols["item_id"] = pa.array([f"item{j}" for j in range(len(p_items))], pa.string()).take(pa.array(items))
    gu, ii = slice(0, n_g + n_u), slice(n_g + n_u, None)
    if ntv:
        cols["global_features"] = _ntv_column(x[:, gu], present[:, gu], feats["g"] + feats["u"])
        cols["user_features"] = _ntv_column(x[:, n_g:n_g + n_u], present[:, n_g:n_g + n_u], feats["u"])
        cols["item_features"] = _ntv_column(x[:, ii], present[:, ii], feats["i"])
    else:
        for j, (name, _) in enumerate(feats["g"] + feats["u"] + feats["i"]):
            cols[name] = pa.array(x[:, j], mask=~present[:, j])
    return pa.table(cols)


def suggested_bags(n_global: int, n_user_features: int, n_item_features: int, ntv: bool) -> dict:
    """Feature bags for a config: the per-user bag shares the global bag's source."""
    if ntv:
        return {"global": {"ntv": "global_features"}, "per_user": {"ntv": "global_features"},
                "per_item": {"ntv": "item_features"}}
    gu = [f for f, _ in _features("g", n_global, False) + _features("u", n_user_features, False)]
    return {"global": {"columns": gu}, "per_user": {"columns": gu},
            "per_item": {"columns": [f for f, _ in _features("i", n_item_features, False)]}}


def generate(out_dir: str, n_rows: int, n_users: int, n_items: int, n_global: int = 5,
             n_user_features: int = 4, n_item_features: int = 3, seed: int = 0, ntv: bool = True,
             weight: bool = False, offset: bool = False, presence: float = 0.8,
             chunk_rows: int = 1_000_000, task: str = "logistic", spread: float = 1.0) -> dict:
    """Write ``out_dir/train/part-*.parquet`` and ``out_dir/truth.json``; returns a summary.
    ``spread`` scales every true coefficient (and so the logit): below 1, milder counts
    for ``task: poisson``, whose curvature e^s grows with the logit."""
    truth = _truth(np.random.default_rng([seed, 0]), n_global, n_user_features, n_item_features,
                   n_users, n_items)
    truth = {k: v * spread for k, v in truth.items()}
    feats = {"g": _features("g", n_global, ntv), "u": _features("u", n_user_features, ntv),
             "i": _features("i", n_item_features, ntv)}
    p_users, p_items = _entity_probabilities(n_users), _entity_probabilities(n_items)
    train = os.path.join(out_dir, "train")
    os.makedirs(train, exist_ok=True)
    for old in os.listdir(train):  # a smaller rerun must not leave stale parts behind
        if old.startswith("part-"):
            os.remove(os.path.join(train, old))
    positives, files = 0.0, 0
    for k, start in enumerate(range(0, n_rows, chunk_rows)):
        n = min(chunk_rows, n_rows - start)
        t = _chunk(np.random.default_rng([seed, 1, k]), start, n, truth, feats, p_users, p_items,
                   presence, ntv, weight, offset, task)
        positives += float(np.sum(t["label"].to_numpy()))
        path = os.path.join(train, f"part-{k:05d}.parquet")
        pq.write_table(t, path + ".tmp")
        os.replace(path + ".tmp", path)
        files += 1

    def ntv_list(pairs, values):
        return [{"name": n, "term": t, "value": float(v)} for (n, t), v in zip(pairs, values)]

    doc = {
        "seed": seed, "rows": n_rows, "ntv": ntv, "weight": weight, "offset": offset,
        "positive_rate": positives / max(n_rows, 1),
        "bags": suggested_bags(n_global, n_user_features, n_item_features, ntv),
        "global": {"intercept": truth["intercept"],
                   "coefficients": ntv_list(feats["g"] + feats["u"],
                                            np.r_[truth["beta_g"], truth["beta_u"]])},
        "per_user": {"entity": "user_id", "features": [list(f) for f in feats["u"]],
                     "ids": list(range(n_users)), "intercept": truth["user_intercept"].tolist(),
                     "coefficients": truth["user_slopes"].tolist()},
        "per_item": {"entity": "item_id", "features": [list(f) for f in feats["i"]],
                     "ids": [f"item{j}" for j in range(n_items)],
                     "intercept": truth["item_intercept"].tolist(),
                     "coefficients": truth["item_slopes"].tolist()},
    }
    truth_path = os.path.join(out_dir, "truth.json")
    with open(truth_path + ".tmp", "w") as f:
        json.dump(doc, f)
    os.replace(truth_path + ".tmp", truth_path)
    return {"rows": n_rows, "files": files, "train": train, "truth": truth_path,
            "positive_rate": doc["positive_rate"], "bags": doc["bags"]}


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description="Write a synthetic GLMix dataset with known truth.")
    p.add_argument("out_dir", nargs="?", default="data/synthetic")
    p.add_argument("--rows", type=int, default=200_000)
    p.add_argument("--users", type=int, default=2_000)
    p.add_argument("--items", type=int, default=500)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--plain", action="store_true", help="plain numeric columns, not ntv lists")
    p.add_argument("--weight", action="store_true")
    p.add_argument("--offset", action="store_true")
    p.add_argument("--global-features", type=int, default=5)
    p.add_argument("--user-features", type=int, default=4)
    a = p.parse_args(argv)
    info = generate(a.out_dir, a.rows, a.users, a.items, n_global=a.global_features,
                    n_user_features=a.user_features, seed=a.seed, ntv=not a.plain, weight=a.weight, offset=a.offset)
    print(f"synthetic: {info['rows']} rows in {info['files']} files, positive rate "
          f"{info['positive_rate']:.3f} -> {a.out_dir}")


if __name__ == "__main__":
    main()
