"""``l2: [λ, ...]``: the embedded search over a coordinate's grid of L2 weights.

Gridded coordinates are searched one at a time, in config order, each over its grid
while every other coordinate holds its current best (a gridded one not searched yet: its
largest λ): Σ_c |grid_c| runs, not Π_c |grid_c| (docs/design.md §7.4). A grid is walked
along the regularisation path, largest λ first, each point warm-started from the
previous point's exported models (``warm_start``). Each point is a whole run of the plan
in its own work directory, ``<workdir>/grid/<coordinate>=<λ>/``, reran or resumed as
any run is; a point's value is the ``select`` metric (default: AUC, else the first
configured metric) of the step it exports. The best point of the last search holds
every coordinate at its best; its models, metrics.json, objective.json and report are
copied to the run's work directory, with ``grid.json`` (every point's metrics) and a
table and plot of metric against λ in the report.

The points run through ``run_point``, the embedded driver's own run, so this module does
not import the driver (which dispatches here).
"""
from __future__ import annotations

import dataclasses

from gdmix import layout, storage
from gdmix.config import Config
from gdmix.metric_names import LOWER_IS_BETTER

GRID_DIR = "grid"
GRID_JSON = "grid.json"
COPIED = ("models", "metrics.json", "objective.json")  # the chosen point's outputs (and its report)


def gridded(cfg: Config) -> bool:
    return any(c.l2_grid is not None for c in cfg.coordinates)


def metric_of(cfg: Config) -> str:
    """The metric the search maximises (minimises for log loss and RMSE)."""
    return cfg.select or ("auc" if "auc" in cfg.metrics else cfg.metrics[0])


def point_dir(workdir: str, coordinate: str, lam: float) -> str:
    return storage.join(workdir, GRID_DIR, f"{coordinate}={lam:g}")


def point_config(cfg: Config, l2: dict[str, float], workdir: str, warm_start: str | None) -> Config:
    """``cfg`` with every coordinate's λ fixed as in ``l2`` (no grid left), in its own work
    directory, warm-started from ``warm_start``; nothing published from a point."""
    coords = tuple(dataclasses.replace(c, l2=float(l2[c.name]), l2_grid=None) if c.name in l2 else c
                   for c in cfg.coordinates)
    return dataclasses.replace(cfg, coordinates=coords, workdir=workdir, warm_start=warm_start, publish=None)


def value(cfg: Config, records: list[dict]) -> float | None:
    """A point's value: its exported step's metric (``selected``, else the last step's)."""
    m = metric_of(cfg)
    chosen = [r for r in records if r.get("selected")] or records[-1:]
    return chosen[0].get(m) if chosen else None


def better(metric: str, a: float | None, b: float | None) -> bool:
    """Whether a beats b (None loses; of equal values the earlier point stays: a larger λ)."""
    if a is None:
        return False
    if b is None:
        return True
    return a < b if metric in LOWER_IS_BETTER else a > b


def start(cfg: Config) -> dict[str, float]:
    """Every coordinate's λ before any search: a gridded one's largest."""
    return {c.name: (max(c.l2_grid) if c.l2_grid else c.l2) for c in cfg.coordinates}


def path(c) -> list[float]:
    """A coordinate's grid in search order: the regularisation path, largest λ first."""
    return sorted(c.l2_grid, reverse=True)


def refuse_publish(cfg: Config) -> None:
    if cfg.publish is not None:
        raise ValueError("publish: an l2 grid run publishes nothing itself; run `gdmix publish` on the "
                         f"chosen point's work directory (under {storage.join(cfg.workdir, GRID_DIR)})")


def row(cfg: Config, coordinate: str, lam: float, best: dict, records: list[dict]) -> dict:
    """One point's line of grid.json: its value and the λ the others held."""
    return {"coordinate": coordinate, "l2": lam, metric_of(cfg): value(cfg, records),
            "workdir": point_dir(cfg.workdir, coordinate, lam),
            "held": {k: best[k] for k in best if k != coordinate}}


def settle(cfg: Config, table: list[dict], rows: list[dict], best: dict) -> dict:
    """End one coordinate's search: its rows join ``table`` (replacing any earlier ones of the
    coordinate), the best becomes chosen and its λ the coordinate's in ``best``."""
    metric, coordinate = metric_of(cfg), rows[0]["coordinate"]
    top = None
    for r in rows:  # in path order: of equal values the larger λ stays
        if top is None or better(metric, r[metric], top[metric]):
            top = r
    table[:] = [r for r in table if r["coordinate"] != coordinate] + rows
    for r in rows:
        r["chosen"] = r is top
    best[coordinate] = top["l2"]
    return top


def search(cfg: Config, run_point) -> list[dict]:
    """Search every gridded coordinate (see the top); ``run_point(cfg)`` runs one point and
    returns its metrics records. Returns the chosen point's records."""
    refuse_publish(cfg)
    best = start(cfg)
    table, warm, chosen = [], cfg.warm_start, None
    for c in (c for c in cfg.coordinates if c.l2_grid is not None):
        rows, records_of = [], {}
        for lam in path(c):
            wd = point_dir(cfg.workdir, c.name, lam)
            point = point_config(cfg, {**best, c.name: lam}, wd, warm)
            print(f"grid: {c.name} l2 = {lam:g} in {wd}", flush=True)
            records_of[wd] = run_point(point)
            rows.append(row(cfg, c.name, lam, best, records_of[wd]))
            print(f"grid: {c.name} l2 = {lam:g}: {metric_of(cfg)} {rows[-1][metric_of(cfg)]}", flush=True)
            warm = storage.join(wd, "models")  # the next point starts from this one's models
        top = settle(cfg, table, rows, best)
        chosen = records_of[top["workdir"]]
        _publish_chosen(cfg, top["workdir"], table, metric_of(cfg), best)
    return chosen


# On a cluster (pipelines/gdmix_pipeline.py) each point is a branch of a ParallelFor, started
# cold, and after each coordinate's branches ``select`` does what ``search`` does between
# coordinates, from the files the branches left.

def held(cfg: Config) -> dict[str, float]:
    """Every coordinate's λ as the searches so far left it (grid.json's ``chosen``)."""
    doc = _grid_doc(cfg)
    return {**start(cfg), **(doc["chosen"] if doc else {})}


def cluster_point(cfg: Config, coordinate: str, lam: float) -> Config:
    """A pipeline branch's config: λ for ``coordinate``, the others held, started cold
    (or from the config's warm_start)."""
    refuse_publish(cfg)
    return point_config(cfg, {**held(cfg), coordinate: lam}, point_dir(cfg.workdir, coordinate, lam),
                        cfg.warm_start)


def select(cfg: Config, coordinate: str) -> dict:
    """After a coordinate's branches: choose its best point from their metrics.json, publish
    it into the run's work directory with grid.json. Returns grid.json's content."""
    doc = _grid_doc(cfg)
    best = held(cfg)
    table = [r for r in (doc["points"] if doc else []) if r["coordinate"] != coordinate]
    c = cfg.coordinate(coordinate)
    if c.l2_grid is None:
        raise ValueError(f"{coordinate}: l2 is not a grid")
    rows = [row(cfg, coordinate, lam, best, storage.read_json(layout.metrics(point_dir(cfg.workdir, coordinate, lam))))
            for lam in path(c)]
    top = settle(cfg, table, rows, best)
    _publish_chosen(cfg, top["workdir"], table, metric_of(cfg), best)
    return _grid_doc(cfg)


def _grid_doc(cfg: Config) -> dict | None:
    url = storage.join(cfg.workdir, GRID_JSON)
    return storage.read_json(url) if storage.exists(url) else None


def _publish_chosen(cfg: Config, point_wd: str, table: list[dict], metric: str, best: dict) -> None:
    """The chosen point's outputs into the run's work directory, with the grid table."""
    from gdmix import report

    for name in COPIED:
        storage.remove(storage.join(cfg.workdir, name))
        storage.copy(storage.join(point_wd, name), storage.join(cfg.workdir, name))
    doc = {"metric": metric, "chosen": {k: best[k] for k in best}, "chosen_workdir": point_wd, "points": table}
    storage.write_json(storage.join(cfg.workdir, GRID_JSON), doc)
    with storage.open_file(layout.report(point_wd), "r") as f:
        page = f.read()
    section = report.grid_section(doc)
    page = page.replace("</body>", section + "</body>") if "</body>" in page else page + section
    storage.write_text(layout.report(cfg.workdir), page)
