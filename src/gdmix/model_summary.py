"""What the report shows of the exported models (``models/<coordinate>/``, name-term-value
records, ``gdmix.ntv``): the fixed effect's largest coefficients, and how a random
effect's per-entity coefficients spread across its entities.

Both stream the model files a batch at a time with pyarrow (no Spark). A random effect's
spread is over the entities that have a model: for its intercept and for each feature,
the number of entities whose model holds it, and the mean, standard deviation and
5 / 50 / 95 % quantiles of its value across them.
"""
from __future__ import annotations

import numpy as np
import pyarrow.compute as pc

from gdmix import kinds, layout, schema, storage
from gdmix.config import Config, Coordinate
from gdmix.kinds.base import NameTermValueKind

TOP = 15  # fixed-effect coefficients shown, by |value|
SPREAD_FEATURES = 8  # random-effect features shown besides the intercept, by spread


def has_ntv_model(cfg: Config, workdir: str, coord: Coordinate) -> bool:
    """A name-term-value kind whose exported model is there (a dnn or external one is not)."""
    return (isinstance(kinds.of(coord), NameTermValueKind)
            and bool(storage.parquet_files(layout.model(workdir, coord.name))))


def _name(name: str, term: str) -> str:
    return f"{name}:{term}" if term else name


def _terms(url: str):
    """(model id, names, values) per model of an exported model folder."""
    for batch in storage.iter_batches(url, [schema.MODEL_ID, "means"]):
        means = batch.column("means")
        flat = pc.list_flatten(means)
        offsets = means.offsets.to_numpy()
        names = flat.field("name").to_numpy(zero_copy_only=False)
        terms = flat.field("term").to_numpy(zero_copy_only=False)
        values = flat.field("value").to_numpy(zero_copy_only=False)
        ids = batch.column(schema.MODEL_ID).to_pylist()
        for i, mid in enumerate(ids):
            a, b = offsets[i] - offsets[0], offsets[i + 1] - offsets[0]
            yield mid, [_name(n, t) for n, t in zip(names[a:b], terms[a:b])], values[a:b]


def largest_coefficients(workdir: str, coord: Coordinate, top: int = TOP) -> dict:
    """{"intercept": b, "features": n, "largest": [(feature, value), ...]} of a fixed
    effect's model, the ``top`` largest by absolute value (the intercept apart)."""
    intercept, pairs = 0.0, []
    for _, names, values in _terms(layout.model(workdir, coord.name)):
        for n, v in zip(names, values):
            if n == schema.INTERCEPT_NAME:
                intercept = float(v)
            else:
                pairs.append((n, float(v)))
    pairs.sort(key=lambda p: (-abs(p[1]), p[0]))
    return {"intercept": intercept, "features": len(pairs), "largest": pairs[:top]}


def _flat_terms(url: str):
    """(coefficient names, values, models) per batch of an exported model folder, as
    arrays (vectorised: a random effect may have millions of models)."""
    for batch in storage.iter_batches(url, ["means"]):
        flat = pc.list_flatten(batch.column("means"))
        name, term = flat.field("name"), flat.field("term")
        key = pc.if_else(pc.equal(term, ""), name, pc.binary_join_element_wise(name, term, ":"))
        yield key.dictionary_encode(), flat.field("value").to_numpy(zero_copy_only=False), batch.num_rows


def entity_spread(workdir: str, coord: Coordinate, features: int = SPREAD_FEATURES) -> dict:
    """{"entities": n, "rows": [{"coefficient", "entities", "mean", "std", "q05", "q50",
    "q95"}, ...], "intercepts": array}: the intercept first, then the ``features`` features
    with the largest standard deviation across entities."""
    parts: dict[str, list[np.ndarray]] = {}
    n = 0
    for keys, values, models in _flat_terms(layout.model(workdir, coord.name)):
        n += models
        codes = keys.indices.to_numpy(zero_copy_only=False)
        order = np.argsort(codes, kind="stable")
        bounds = np.searchsorted(codes[order], np.arange(len(keys.dictionary) + 1))
        for k, name in enumerate(keys.dictionary.to_pylist()):
            parts.setdefault(name, []).append(values[order[bounds[k]:bounds[k + 1]]])
    by_name = {k: np.concatenate(v) for k, v in parts.items()}

    def row(name: str) -> dict:
        v = by_name[name]
        q05, q50, q95 = np.quantile(v, [0.05, 0.5, 0.95])
        return {"coefficient": name, "entities": len(v), "mean": float(v.mean()), "std": float(v.std()),
                "q05": float(q05), "q50": float(q50), "q95": float(q95)}

    icp = schema.INTERCEPT_NAME
    rows = [row(icp)] if icp in by_name else []
    others = sorted((row(k) for k in by_name if k != icp and len(by_name[k])), key=lambda r: (-r["std"], r["coefficient"]))
    return {"entities": n, "rows": rows + others[:features],
            "intercepts": by_name.get(icp, np.zeros(0))}
