"""Reading and writing the work directory through fsspec (local paths, gs://, any URL).

A reader never sees half a file and a crashed stage leaves no output that looks complete:
on a local (or mounted) filesystem every output is written under a temporary name and
renamed into place; on an object store (gs://) a single file is written to its final
name directly, since an object becomes visible only when its upload has completed, and
a folder is written under a temporary prefix and then copied into place object by object
(an object store has no folder rename: what makes a folder complete there, as
everywhere, is the done marker its stage writes after it).
"""
from __future__ import annotations

import json
import os
import posixpath
import uuid
from contextlib import contextmanager

import fsspec
import pyarrow as pa
import pyarrow.parquet as pq


def filesystem(url: str):
    """(fs, path) for a URL or local path."""
    return fsspec.core.url_to_fs(url)


def is_local(url: str) -> bool:
    return "://" not in url or url.startswith("file://")


def join(base: str, *parts: str) -> str:
    base = base.rstrip("/")
    return posixpath.join(base, *[str(p).strip("/") for p in parts])


def absolute(url: str) -> str:
    """A local path made absolute (so it means the same in worker processes); URLs as given."""
    if url.startswith("file://"):
        url = url[len("file://"):]
    return os.path.abspath(url) if is_local(url) else url


def exists(url: str) -> bool:
    fs, path = filesystem(url)
    return fs.exists(path)


def open_file(url: str, mode: str = "rb"):
    return fsspec.open(url, mode).open()


def makedirs(url: str) -> None:
    fs, path = filesystem(url)
    fs.makedirs(path, exist_ok=True)


def remove(url: str) -> None:
    fs, path = filesystem(url)
    if fs.exists(path):
        fs.rm(path, recursive=True)


def copy(src: str, dst: str) -> None:
    """Copy a file or a folder (recursively) to ``dst``, on the same filesystem."""
    fs, a = filesystem(src)
    fs.copy(a, filesystem(dst)[1], recursive=True)


def _temporary_name(url: str) -> str:
    head, tail = posixpath.split(url.rstrip("/"))
    return posixpath.join(head, f"_tmp-{tail}-{uuid.uuid4().hex[:12]}")


def commit(tmp_url: str, final_url: str) -> None:
    """Move a finished temporary file or folder to its final name, replacing any old one."""
    fs, tmp = filesystem(tmp_url)
    _, final = filesystem(final_url)
    if fs.exists(final):
        fs.rm(final, recursive=True)
    fs.makedirs(posixpath.dirname(final), exist_ok=True)
    if is_local(tmp_url):
        fs.mv(tmp, final, recursive=True)
    else:
        # Server-side copies, then the temporary objects deleted: every GCS-compatible
        # store has both, while gcsfs's mv tries the newer objects.moveTo first and on a
        # store without it (emulators) retries for half a minute per object.
        fs.copy(tmp, final, recursive=True)
        fs.rm(tmp, recursive=True)


def remove_stale_temporaries(final_url: str) -> list[str]:
    """Remove temporaries of ``final_url`` an earlier, killed writer left (``_tmp-<name>-*``
    beside it): the writer about to start replaces them, so a rerun leaves none behind."""
    fs, final = filesystem(final_url)
    head, tail = posixpath.split(final.rstrip("/"))
    pattern = posixpath.join(head, f"_tmp-{tail}-" + "[0-9a-f]" * 12)
    try:
        stale = fs.glob(pattern)
    except FileNotFoundError:
        return []
    for p in stale:
        fs.rm(p, recursive=True)
    return stale


@contextmanager
def atomic_path(final_url: str):
    """Yield a temporary URL to write to; on success it is committed to ``final_url``,
    on failure removed (and one a killed writer left is removed when the next starts)."""
    remove_stale_temporaries(final_url)
    tmp = _temporary_name(final_url)
    try:
        yield tmp
        commit(tmp, final_url)
    except BaseException:
        remove(tmp)
        raise


@contextmanager
def _atomic_file(url: str):
    """Where to write the one file ``url`` so that it appears whole: a temporary name
    renamed into place on a local filesystem, the final name itself on an object store."""
    if is_local(url):
        makedirs(posixpath.dirname(url))
        with atomic_path(url) as tmp:
            yield tmp
    else:
        yield url


def write_json(url: str, obj) -> None:
    with _atomic_file(url) as tmp:
        with fsspec.open(tmp, "w") as f:
            json.dump(obj, f, indent=2, sort_keys=False, default=_json_default)


def _json_default(o):
    import numpy as np

    if isinstance(o, np.generic):
        return o.item()
    raise TypeError(f"not JSON serialisable: {type(o).__name__}")


def read_json(url: str):
    with fsspec.open(url, "r") as f:
        return json.load(f)


def write_text(url: str, text: str) -> None:
    with _atomic_file(url) as tmp:
        with fsspec.open(tmp, "w") as f:
            f.write(text)


def write_table(url: str, table: pa.Table) -> None:
    """Write one Parquet file atomically."""
    fs, _ = filesystem(url)
    with _atomic_file(url) as tmp:
        _, tmp_path = filesystem(tmp)
        pq.write_table(table, tmp_path, filesystem=fs)


def parquet_files(url: str) -> list[str]:
    """The data files of a Parquet folder (or the one file), as paths of its filesystem;
    empty when there is nothing at ``url``."""
    fs, path = filesystem(url)
    if not fs.exists(path):
        return []
    if not fs.isdir(path):
        return [path]
    return sorted(p for p in fs.find(path) if p.endswith(".parquet")
                  and not posixpath.basename(p).startswith(("_", ".")))


def input_files(url: str) -> list[str]:
    """The data files Spark reads for a Parquet input (a file, a folder or a glob): every
    file under it whose path below the input holds no ``_`` or ``.`` name, in name order."""
    fs, path = filesystem(url)
    roots = sorted(fs.glob(path)) if any(c in path for c in "*?[") else [path]
    out = []
    for root in roots:
        if not fs.exists(root):
            continue
        if not fs.isdir(root):
            out.append(root)
            continue
        for f in sorted(fs.find(root)):
            rel = posixpath.relpath(f, root)
            if not any(p.startswith(("_", ".")) for p in rel.split("/")):
                out.append(f)
    return out


def size_bytes(url: str) -> int:
    """Bytes of everything at ``url`` (a file or a folder, recursively); 0 if absent."""
    fs, path = filesystem(url)
    return int(fs.du(path, total=True)) if fs.exists(path) else 0


def parquet_rows(url: str) -> int:
    """Rows in a Parquet file or folder, from the footers alone (a file whose footer cannot
    be read, truncated or not Parquet: ``DamagedOutput`` naming it)."""
    fs, _ = filesystem(url)
    total = 0
    for p in parquet_files(url):
        try:
            with fs.open(p, "rb") as f:
                total += pq.ParquetFile(f).metadata.num_rows
        except (OSError, ValueError) as e:  # pyarrow's ArrowInvalid is a ValueError
            if isinstance(e, FileNotFoundError):
                raise
            raise DamagedOutput(f"{p}: not a readable Parquet file ({type(e).__name__}: {e})") from None
    return total


def read_row_range(url: str, start: int, stop: int, schema: pa.Schema) -> pa.Table:
    """Rows ``start:stop`` of a Parquet file or folder (its files in name order), the
    columns of ``schema``, reading only the row groups that hold them."""
    columns = schema.names
    fs, _ = filesystem(url)
    parts, at = [], 0
    for p in parquet_files(url):
        with fs.open(p, "rb") as f:
            pf = pq.ParquetFile(f)
            for g in range(pf.metadata.num_row_groups):
                n = pf.metadata.row_group(g).num_rows
                if at < stop and at + n > start:
                    t = pf.read_row_group(g, columns=columns)
                    parts.append(t.slice(max(start - at, 0), min(stop, at + n) - max(start, at)))
                at += n
    return pa.concat_tables(parts).cast(schema) if parts else schema.empty_table()


def iter_batches(url: str, columns: list[str]):
    """Record batches of a Parquet file or folder, a few columns at a time (bounded memory)."""
    fs, _ = filesystem(url)
    files = parquet_files(url)
    if files:
        import pyarrow.dataset as pads

        yield from pads.dataset(files, filesystem=fs, format="parquet").to_batches(columns=columns)


def read_table(url: str, columns=None, schema: pa.Schema | None = None) -> pa.Table:
    """Read a Parquet file, or every part file in a folder, as one table.

    A missing folder reads as an empty table when ``schema`` is given (an empty shard).
    """
    fs, path = filesystem(url)
    if not fs.exists(path):
        if schema is not None:
            return schema.empty_table() if columns is None else schema.empty_table().select(columns)
        raise FileNotFoundError(url)
    if fs.isdir(path):
        files = parquet_files(url)
        if not files:
            if schema is not None:
                return schema.empty_table() if columns is None else schema.empty_table().select(columns)
            raise FileNotFoundError(f"{url}: no Parquet files")
        import pyarrow.dataset as pads  # here: it loads pandas (read_columns does not)

        ds = pads.dataset(files, filesystem=fs, format="parquet", schema=schema)
        return ds.to_table(columns=columns)
    return pq.read_table(path, filesystem=fs, columns=columns, schema=schema)


def read_columns(url: str, columns: list[str], schema: pa.Schema) -> pa.Table:
    """``columns`` of a Parquet file or folder (its files in name order) as ``schema`` has
    them, file by file: what ``read_table`` gives, without the dataset layer (and its
    import of pandas). A missing folder is an empty table; a column a file lacks, nulls."""
    want = _wanted(columns, schema)
    fs, _ = filesystem(url)
    parts = []
    for p in parquet_files(url):
        with fs.open(p, "rb") as fh:
            pf = pq.ParquetFile(fh)
            have = set(pf.schema_arrow.names)
            # a column at a time: the decoder's scratch is one column's, not the file's
            parts.append(_as_wanted(want, pf.metadata.num_rows,
                                    lambda c: pf.read(columns=[c], use_threads=False).column(0), have))
    return pa.concat_tables(parts) if parts else _as_wanted(want, 0, None, set())


def iter_columns(url: str, columns: list[str], schema: pa.Schema, batch_rows: int):
    """``read_columns``'s rows in the same order, as tables of at most ``batch_rows`` rows
    each decoded on its own (``ParquetFile.iter_batches``): memory O(batch), not O(file),
    on any filesystem. A missing folder yields nothing; a column a file lacks, nulls."""
    if batch_rows < 1:
        raise ValueError(f"batch_rows must be at least 1, got {batch_rows}")
    want = _wanted(columns, schema)
    fs, _ = filesystem(url)
    for p in parquet_files(url):
        with fs.open(p, "rb") as fh:
            pf = pq.ParquetFile(fh)
            have = [c for c in columns if c in pf.schema_arrow.names]
            if not have:  # nothing to decode: the file's row count in nulls
                n = pf.metadata.num_rows
                for at in range(0, n, batch_rows):
                    yield _as_wanted(want, min(batch_rows, n - at), None, set())
                continue
            for b in pf.iter_batches(batch_size=batch_rows, columns=have, use_threads=False):
                yield _as_wanted(want, b.num_rows, b.column, set(have))


def _wanted(columns: list[str], schema: pa.Schema) -> pa.Schema:
    return pa.schema([schema.field(c) for c in columns])


def _as_wanted(want: pa.Schema, n: int, read, have: set[str]) -> pa.Table:
    """``n`` rows of ``want``'s columns: ``read(name)`` cast to its type where the file
    has the column (``have``), nulls where it does not."""
    return pa.Table.from_arrays([read(f.name).cast(f.type) if f.name in have else pa.nulls(n, f.type)
                                 for f in want], schema=want)


def list_dirs(url: str) -> list[str]:
    fs, path = filesystem(url)
    if not fs.exists(path):
        return []
    return sorted(posixpath.basename(p.rstrip("/")) for p in fs.ls(path, detail=False) if fs.isdir(p))


# --- stage completion markers ---------------------------------------------------------

class DamagedOutput(RuntimeError):
    """A finished stage's output no longer holds what its done marker recorded (a file
    lost, truncated or replaced): the message names the file and the stage to redo."""


def verify_rows(url: str, expected: int, step_url: str, stage: str, redo: str) -> int:
    """Check, from the Parquet footers alone, that ``url`` holds the ``expected`` rows that
    stage ``stage`` (done marker in ``step_url``) wrote. On a mismatch that stage's done
    marker is removed, so a rerun redoes it, and ``DamagedOutput`` says so (``redo``: the
    command that redoes it)."""
    fs, _ = filesystem(url)
    total, problem = 0, None
    files = parquet_files(url)
    for p in files:
        try:
            with fs.open(p, "rb") as f:
                total += pq.ParquetFile(f).metadata.num_rows
        except Exception as e:  # noqa: BLE001 - truncated or not Parquet
            problem = f"{p}: unreadable ({type(e).__name__}: {e})"
            break
    if problem is None and not files and expected:  # an empty split may have no files at all
        problem = f"{url}: no data files"
    elif problem is None and total != expected:
        problem = f"{url}: {total} rows, but {expected} expected: rows were lost or duplicated"
    if problem is None:
        return total
    remove(marker(step_url, stage))
    raise DamagedOutput(f"{problem}: an output of the {stage} stage in {step_url} is damaged or "
                        f"incomplete; its done marker is removed, redo that stage: {redo}")


def marker(step_url: str, stage: str) -> str:
    return join(step_url, f"_DONE-{stage}.json")


def mark_done(step_url: str, stage: str, info: dict) -> None:
    write_json(marker(step_url, stage), info)


def done_info(step_url: str, stage: str) -> dict | None:
    url = marker(step_url, stage)
    return read_json(url) if exists(url) else None


# --- fingerprints of what a stage read (safe reruns) ------------------------------------

def fingerprint(url: str) -> dict:
    """What identifies the input at ``url`` (a file, a folder or a glob) without reading
    it: every file's path, size and modification time (an object store's generation where
    it has one), as a count, a byte total and a digest. Two fingerprints differ when a
    file was added, removed, rewritten or touched; {"files": 0} when nothing is there."""
    import hashlib

    fs, path = filesystem(url)
    if any(ch in path for ch in "*?["):
        paths = fs.glob(path)
    elif fs.exists(path):
        paths = [path]
    else:
        paths = []
    infos = {}
    for p in paths:
        if fs.isdir(p):
            infos.update({k: v for k, v in fs.find(p, detail=True).items()
                          if not posixpath.basename(k).startswith((".", "_"))})
        else:
            infos[p] = fs.info(p)
    rows = []
    for p in sorted(infos):
        info = infos[p]
        stamp = info.get("generation") or info.get("mtime") or info.get("updated") or info.get("LastModified")
        rows.append(f"{p}\t{info.get('size')}\t{stamp}")
    return {"url": url, "files": len(rows), "bytes": int(sum(int(i.get("size") or 0) for i in infos.values())),
            "digest": hashlib.sha256("\n".join(rows).encode()).hexdigest()[:16]}
