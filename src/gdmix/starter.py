"""Starting with your own data, without Spark: ``gdmix init`` writes a starter config from
a Parquet file's columns, ``gdmix check`` validates a config and its data's schema.

``init`` reads the file's schema and a sample of its rows (pyarrow) and guesses:
- the uid: a column named ``uid`` (or ``id``, ``row_id``, ``sample_id``), else the first
  integer column whose values are all distinct;
- the label: a column named ``label`` (or ``y``, ``target``, ``click``, ``clicked``),
  else the first numeric column holding only 0 and 1;
- ``weight`` and ``offset``: used when the file has them under those names;
- an entity: an integer or string column whose values repeat (most rows share their
  value with others), preferring names ending in ``id``: a per-entity random effect;
- the features: every other numeric column, as the global bag (a name-term-value
  column instead when there is no numeric one).
Every guess is written as a commented line of YAML, to be read and edited.

``check`` runs the config's checks (``kinds.load_config``: every key, every kind), then,
for each input, the column checks ``prepare`` starts with: the columns it reads exist,
with usable types (from the Parquet footers: no Spark, no row read). Row-level rules
(labels 0/1, unique uids, NaN) are ``prepare``'s, over every row.
"""
from __future__ import annotations

import os

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.types as pt

from gdmix import checks, kinds, stages, storage
from gdmix.checks import InputError
from gdmix.config import Config
from gdmix.kinds import external

UID_NAMES = ("uid", "id", "row_id", "sample_id")
LABEL_NAMES = ("label", "y", "target", "click", "clicked")
SAMPLE_ROWS = 200_000


def _numeric(t: pa.DataType) -> bool:
    return pt.is_integer(t) or pt.is_floating(t) or pt.is_boolean(t) or pt.is_decimal(t)


def _is_ntv(t: pa.DataType) -> bool:
    if not (pt.is_list(t) or pt.is_large_list(t)) or not pt.is_struct(t.value_type):
        return False
    sub = {t.value_type.field(i).name: t.value_type.field(i).type for i in range(t.value_type.num_fields)}
    return (pt.is_string(sub.get("name", pa.null())) or pt.is_large_string(sub.get("name", pa.null()))) \
        and _numeric(sub.get("value", pa.null())) \
        and ("term" not in sub or pt.is_string(sub["term"]) or pt.is_large_string(sub["term"]))


def _sample(url: str, columns: list[str]) -> pa.Table:
    batches, n = [], 0
    for b in storage.iter_batches(url, columns):
        batches.append(b)
        n += b.num_rows
        if n >= SAMPLE_ROWS:
            break
    return pa.Table.from_batches(batches) if batches else pa.table({})


def guess(url: str) -> dict:
    """What ``init`` reads from a Parquet file: uid, label, weight, offset, entity,
    features (plain numeric columns) or ntv (a name-term-value column), ignored."""
    found = stages.input_schema(url)
    if found is None:
        raise InputError(f"{url}: no Parquet file there")
    types = {f.name: f.type for f in found}
    sample = _sample(url, [n for n, t in types.items() if _numeric(t) or pt.is_string(t) or pt.is_large_string(t)])
    rows = sample.num_rows
    ints = [n for n, t in types.items() if pt.is_integer(t)]

    def distinct(name):
        return len(pc.unique(sample.column(name)))

    uid = next((n for n in UID_NAMES if n in types and pt.is_integer(types[n])), None) \
        or next((n for n in ints if distinct(n) == rows and sample.column(n).null_count == 0), None)
    zero_one = [n for n, t in types.items() if _numeric(t) and n != uid and rows
                and set(pc.unique(sample.column(n).cast(pa.float64())).to_pylist()) <= {0.0, 1.0}]
    label = next((n for n in LABEL_NAMES if n in types and _numeric(types[n])), None) \
        or (zero_one[0] if zero_one else None)
    weight = "weight" if "weight" in types and _numeric(types["weight"]) else None
    offset = "offset" if "offset" in types and _numeric(types["offset"]) else None
    taken = {uid, label, weight, offset}
    candidates = []
    for n, t in types.items():
        if n in taken or not (pt.is_integer(t) or pt.is_string(t) or pt.is_large_string(t)) or not rows:
            continue
        k = distinct(n)
        if 2 <= k <= rows // 2:  # repeated values: rows grouped by an entity
            candidates.append((not n.lower().endswith("id"), -k, n))
    entity = min(candidates)[2] if candidates else None
    features = [n for n, t in types.items() if n not in taken | {entity} and _numeric(t)]
    ntv = next((n for n, t in types.items() if _is_ntv(t)), None)
    ignored = [n for n in types if n not in taken | {entity} and n not in features and n != ntv]
    return {"uid": uid, "label": label, "weight": weight, "offset": offset, "entity": entity,
            "features": features, "ntv": ntv if not features else None,
            "ignored": ignored + ([ntv] if ntv and features else []), "rows_sampled": rows}


def init(data: str, out: str, force: bool = False) -> dict:
    """Write a commented starter config for the Parquet ``data`` to ``out``."""
    if os.path.exists(out) and not force:
        raise FileExistsError(f"{out} exists: choose another --out, or --force to replace it")
    g = guess(data)
    if g["uid"] is None or g["label"] is None:
        missing = " and ".join(k for k in ("uid", "label") if g[k] is None)
        raise InputError(f"{data}: found no {missing} column: gdmix needs a unique integer uid per row "
                         "and a 0/1 label (see the README, Input data)")
    if not g["features"] and not g["ntv"]:
        raise InputError(f"{data}: found no numeric feature column")
    folder = os.path.dirname(os.path.abspath(out))
    name = os.path.splitext(os.path.basename(data.rstrip("/")))[0] or "my-model"
    name = "".join(ch if ch.isalnum() or ch in "-_" else "-" for ch in name)
    rel = os.path.relpath(os.path.abspath(data), folder) if "://" not in data else data
    bag = {"ntv": g["ntv"]} if g["ntv"] else {"columns": g["features"]}
    lines = [
        f"# A starter config written by `gdmix init --data {data}`: read it, edit it, then",
        f"#   gdmix check {os.path.basename(out)}     (config and columns, no training)",
        f"#   gdmix run {os.path.basename(out)}",
        f"name: {name}",
        f"workdir: {os.path.join(folder, 'runs', name)}   # where the run writes (any fsspec URL)",
        "data:",
        f"  train: {rel}   # relative paths are relative to this file's folder",
        "  # validation: path/to/validation.parquet   # else a seeded hash split of train",
        "  validation_fraction: 0.2",
        "  columns:",
        f"    uid: {g['uid']}       # unique integer per row",
        f"    label: {g['label']}   # 0 or 1",
        f"    weight: {g['weight'] or 'null'}   # {'found in the file' if g['weight'] else 'none found: every row weighs 1'}",
        f"    offset: {g['offset'] or 'null'}   # {'found in the file' if g['offset'] else 'none found: offset 0'}",
        "  feature_bags:",
        f"    global: {_flow(bag)}",
    ]
    if g["ignored"]:
        lines.append(f"  # not used: {', '.join(g['ignored'])}")
    coords = ["  - {name: global, type: fixed_effect, feature_bag: global, l2: 1.0}"]
    metrics = ["auc", "logloss"]
    if g["entity"]:
        ent = g["entity"]
        cname = "per-" + "".join(ch if ch.isalnum() or ch in "-_" else "-" for ch in ent)
        coords.append(f"  # one model per {ent} value: a smaller bag of its own is usual")
        coords.append(f"  - {{name: {cname}, type: random_effect, entity: {ent}, feature_bag: global, l2: 10.0}}")
        metrics.append(f"auc@{ent}")
    lines += [f"iterations: {2 if g['entity'] else 1}   # coordinate-descent passes",
              "coordinates:   # in update order", *coords, f"metrics: [{', '.join(metrics)}]", ""]
    storage.write_text(out, "\n".join(lines))
    return {"config": out, **{k: g[k] for k in ("uid", "label", "weight", "offset", "entity")},
            "features": g["features"] or [g["ntv"]], "ignored": g["ignored"]}


def _flow(bag: dict) -> str:
    if "ntv" in bag:
        return f"{{ntv: {bag['ntv']}}}"
    return "{columns: [" + ", ".join(bag["columns"]) + "]}"


def _type_ok(t: pa.DataType, need: str) -> bool:
    if need == "integer":
        return pt.is_integer(t)
    if need == "numeric":
        return _numeric(t)
    if need == "entity":
        return pt.is_integer(t) or pt.is_string(t) or pt.is_large_string(t)
    return _is_ntv(t)


NEEDS = {"integer": "an integer (uid)", "numeric": "numeric", "entity": "an integer or a string (entity id)",
         "ntv": "list<struct<name: string, term: string, value: double>>"}


def check_input(cfg: Config, url: str) -> dict:
    """The columns of one input against the config, from its footers; raises InputError."""
    found = stages.input_schema(url)
    if found is None:
        raise InputError(f"{url}: no Parquet input found there")
    types = {f.name: f.type for f in found}
    cols = checks.input_columns(cfg, list(types), url)
    needs = [(cols.uid, "integer"), (cols.label, "numeric"), *((c, "numeric") for c in (cols.weight, cols.offset) if c),
             *((e, "entity") for e in cols.entities), *((p, "numeric") for p in cols.plain),
             *((n, "ntv") for n in cols.ntv)]
    for c in cfg.coordinates:
        if c.external_scores and not external.is_file(c.external_scores):
            needs.append((c.external_scores, "numeric"))
    for column, _ in needs:  # every missing column before any type, as prepare does
        if column not in types:
            raise InputError(f"{url}: column {column!r} is missing (columns present: {', '.join(types)})")
    for column, need in needs:
        if not _type_ok(types[column], need):
            raise InputError(f"{url}: column {column!r} must be {NEEDS[need]}, got {types[column]}")
    return {"url": url, "rows": storage.parquet_rows(url) if not any(ch in url for ch in "*?[") else None,
            "columns": len(types), "weight column": cols.weight, "offset column": cols.offset}


def check(path: str) -> dict:
    """``gdmix check``: the config (every key, every kind), then each input's columns."""
    cfg = kinds.load_config(path)
    out = {"config": path, "coordinates": [f"{c.name} ({kinds.of(c).name})" for c in cfg.coordinates],
           "inputs": {"data.train": check_input(cfg, cfg.data.train)}}
    if cfg.data.validation:
        out["inputs"]["data.validation"] = check_input(cfg, cfg.data.validation)
    out["ok"] = True
    return out
