"""The publish stage: a finished run's models, metrics and report, copied to ``publish.to``
under a dated version; the ``latest`` pointer moves only when the candidate passes the gates.

    <to>/versions/<version>/models/<coordinate>/...     the run's final models
    <to>/versions/<version>/metrics.json, report.html    as finalize wrote them
    <to>/versions/<version>/publish.json                 the AUC used, the gates, the decision
    <to>/latest.json                                     {version, url, auc, published_at, workdir}

A version is ``<UTC time>-<run id>``: the run id is the last path element of the work
directory (the KFP run id when the pipeline gives each run its own directory), so version
names sort by time. The version folder is written under a temporary name and then moved
into place, so a reader never sees half a version. ``latest.json`` is written under a
temporary name and moved over the old one (a rename on a local or mounted volume, an
object overwrite on ``gs://``), so a reader sees the old pointer or the new one, never
none.

The candidate's AUC is the validation AUC of the step whose models the run exported: the
step ``metrics.json`` marks ``"selected": true`` when the config has ``select:`` (the
models are that step's), else the last step recorded there (``publish.json`` says which).
``latest`` is not moved when ``publish.min_auc`` is set and the AUC is lower, or when
``publish.max_auc_drop`` is set and the current latest's AUC exceeds the candidate's by
more than that; the version stays for inspection and ``PublishRefused`` says why, with
the figures. Publishing the same run again (a retried step, or by hand after a gate was
changed) reuses that run's version instead of copying it a second time.
"""
from __future__ import annotations

import json
import posixpath
import re
import shutil
import uuid
from datetime import datetime, timezone

from gdmix import layout, storage
from gdmix.config import Config, ConfigError

VERSIONS = "versions"
LATEST = "latest.json"
RECORD = "publish.json"  # inside each version folder
FILES = ("metrics.json", "report.html")  # besides models/
# Two AUCs this close count as equal (an AUC difference is a float subtraction).
AUC_SLACK = 1e-12


class PublishRefused(RuntimeError):
    """``latest`` was not moved: the run has not finished, or the candidate failed a gate."""


def run_id(workdir: str) -> str:
    """The last path element of the work directory, made safe for a folder name."""
    tail = posixpath.basename(storage.absolute(workdir).rstrip("/"))
    return re.sub(r"[^A-Za-z0-9._-]+", "-", tail).strip("-.")[:64] or "run"


def missing_outputs(cfg: Config, workdir: str) -> list[str]:
    """What finalize should have written and did not (relative to the work directory)."""
    out = [name for name in FILES if not storage.exists(storage.join(workdir, name))]
    out += [f"models/{c.name}" for c in cfg.coordinates if not storage.exists(layout.model(workdir, c.name))]
    return out


def candidate(workdir: str) -> tuple[float | None, dict]:
    """(validation AUC, record) of the step whose models the run exported: the record
    ``metrics.json`` marks ``selected`` (``select:``), else the last step's."""
    url = layout.metrics(workdir)
    records = storage.read_json(url)
    if not isinstance(records, list) or not records:
        raise PublishRefused(f"{url} has no step records: the run evaluated no step")
    last = next((r for r in records if r.get("selected") is True), records[-1])
    auc = last.get("auc")
    return (None if auc is None else float(auc)), last


def current_latest(to: str) -> dict | None:
    """The pointer under a publish folder (what a serving job reads), or None."""
    url = storage.join(to, LATEST)
    return storage.read_json(url) if storage.exists(url) else None


def refusal(cfg: Config, auc: float | None, latest: dict | None) -> str | None:
    """Why ``latest`` must not move to a candidate with this AUC, or None."""
    p = cfg.publish
    if p.min_auc is None and p.max_auc_drop is None:
        return None
    if auc is None:
        return ("the run has no validation AUC (no validation rows), so publish.min_auc and "
                "publish.max_auc_drop cannot be checked")
    if p.min_auc is not None and auc < p.min_auc:
        return f"validation AUC {auc:.6f} is below publish.min_auc {p.min_auc:g}"
    if p.max_auc_drop is not None and latest and latest.get("auc") is not None:
        drop = float(latest["auc"]) - auc
        if drop > p.max_auc_drop + AUC_SLACK:
            return (f"validation AUC {auc:.6f} is {drop:.6f} below the current latest's "
                    f"{float(latest['auc']):.6f} (version {latest.get('version')}), more than "
                    f"publish.max_auc_drop {p.max_auc_drop:g}")
    return None


def _copy(src_url: str, dst_url: str) -> int:
    """Copy a file or a folder's files, across filesystems (local to gs:// and back);
    returns the number of files."""
    sfs, src = storage.filesystem(src_url)
    dfs, dst = storage.filesystem(dst_url)
    files = sfs.find(src) if sfs.isdir(src) else [src]
    made = set()
    for f in files:
        rel = posixpath.relpath(f, src)
        target = dst if rel == "." else posixpath.join(dst, rel)
        if posixpath.dirname(target) not in made:  # a local folder (on gs:// a bucket check)
            dfs.makedirs(posixpath.dirname(target), exist_ok=True)
            made.add(posixpath.dirname(target))
        with sfs.open(f, "rb") as r, dfs.open(target, "wb") as w:
            shutil.copyfileobj(r, w, 1 << 20)
    return len(files)


def _replace_json(url: str, obj: dict) -> None:
    """Write ``obj`` to a temporary name beside ``url``, then move it over ``url``
    (no moment without the file, unlike removing the old one first)."""
    fs, path = storage.filesystem(url)
    fs.makedirs(posixpath.dirname(path), exist_ok=True)
    tmp = posixpath.join(posixpath.dirname(path), f"_tmp-{posixpath.basename(path)}-{uuid.uuid4().hex[:12]}")
    try:
        with fs.open(tmp, "w") as f:
            json.dump(obj, f, indent=2)
        fs.mv(tmp, path)
    except BaseException:
        if fs.exists(tmp):
            fs.rm(tmp)
        raise


def _earlier_version(to: str, workdir: str) -> str | None:
    """This run's version, if an earlier publish of the same work directory wrote one."""
    root = storage.join(to, VERSIONS)
    suffix = "-" + run_id(workdir)
    for name in reversed(storage.list_dirs(root)):
        if name.startswith("_") or not name.endswith(suffix):
            continue
        rec = storage.join(root, name, RECORD)
        if storage.exists(rec) and storage.read_json(rec).get("workdir") == storage.absolute(workdir):
            return name
    return None


def publish(cfg: Config, workdir: str, now: datetime | None = None) -> dict:
    """Copy the finished run in ``workdir`` to ``publish.to`` and move ``latest`` to it when
    the gates hold; raise ``PublishRefused`` (after keeping the version) when they do not."""
    if cfg.publish is None:
        raise ConfigError("publish: not configured (add `publish: {to: URL}` to the config)")
    workdir = storage.absolute(workdir)
    missing = missing_outputs(cfg, workdir)
    if missing:
        raise PublishRefused(f"the run in {workdir} has not finished: no {', '.join(missing)} "
                             "(written by `gdmix finalize`); nothing was published")
    auc, last = candidate(workdir)
    to = storage.absolute(cfg.publish.to)
    latest = current_latest(to)
    now = (now or datetime.now(timezone.utc)).astimezone(timezone.utc)
    stamp = now.strftime("%Y-%m-%dT%H:%M:%SZ")
    earlier = _earlier_version(to, workdir)
    version = earlier or f"{now:%Y%m%dT%H%M%SZ}-{run_id(workdir)}"
    url = storage.join(to, VERSIONS, version)
    reason = refusal(cfg, auc, latest)
    record = {
        "version": version, "url": url, "workdir": workdir, "auc": auc,
        "step": {k: last.get(k) for k in ("iteration", "coordinate", "auc", "logloss", "aupr", "objective")},
        "auc_of": "the selected step" if last.get("selected") is True else "the last step",
        "published_at": stamp,
        "gates": {"min_auc": cfg.publish.min_auc, "max_auc_drop": cfg.publish.max_auc_drop},
        "previous_latest": None if latest is None else {k: latest.get(k) for k in ("version", "auc")},
        "latest_moved": reason is None, "refused": reason,
    }
    if earlier is None:
        with storage.atomic_path(url) as tmp:
            files = _copy(storage.join(workdir, "models"), storage.join(tmp, "models"))
            for name in FILES:
                files += _copy(storage.join(workdir, name), storage.join(tmp, name))
            storage.write_json(storage.join(tmp, RECORD), record)
        print(f"publish: {files} files copied to {url}", flush=True)
    else:
        storage.write_json(storage.join(url, RECORD), record)
        print(f"publish: this run was published before as {version}; reusing {url}", flush=True)
    if reason:
        before = "none" if latest is None else f"{latest.get('version')} (AUC {latest.get('auc')})"
        raise PublishRefused(f"{reason}; latest not moved (still {before}); version {version} "
                             f"kept at {url} for inspection")
    pointer = {"version": version, "url": url, "auc": auc, "published_at": stamp, "workdir": workdir}
    _replace_json(storage.join(to, LATEST), pointer)
    print(f"publish: latest -> {version} (validation AUC {auc})", flush=True)
    return {**pointer, "latest": storage.join(to, LATEST), "reused_version": earlier is not None,
            "previous_latest": record["previous_latest"]}
