"""numpy arrays as Arrow arrays, without loading pandas.

``pa.array`` on a numpy array (or a list) asks pandas whether the values are categorical,
which imports pandas (≈ 0.5-1 s) into any process that builds a column. The random-effect
shards and finish build all their columns from numpy and use nothing of pandas, so they
wrap numpy buffers directly: zero-copy for a contiguous numeric array; booleans are
bit-packed (Arrow's layout: bit i of byte i // 8, least significant first).
"""
from __future__ import annotations

import numpy as np
import pyarrow as pa

_TYPES = {np.dtype(np.int32): pa.int32(), np.dtype(np.int64): pa.int64(),
          np.dtype(np.float32): pa.float32(), np.dtype(np.float64): pa.float64()}
_DTYPES = {t: d for d, t in _TYPES.items()}


def array(values: np.ndarray, type: pa.DataType | None = None) -> pa.Array:
    """``values`` (1-d, numeric or bool, no nulls) as an Arrow array of ``type`` (default:
    the numpy dtype's own)."""
    values = np.asarray(values)
    if values.ndim != 1:
        raise ValueError(f"expected a 1-d array, got shape {values.shape}")
    if values.dtype == np.bool_:
        bits = np.packbits(values, bitorder="little")
        return pa.Array.from_buffers(pa.bool_(), len(values), [None, pa.py_buffer(bits)])
    if type is not None:
        values = values.astype(_DTYPES[type], copy=False)
    if values.dtype not in _TYPES:
        raise TypeError(f"no Arrow column for numpy dtype {values.dtype}")
    values = np.ascontiguousarray(values)
    return pa.Array.from_buffers(_TYPES[values.dtype], len(values), [None, pa.py_buffer(values)])


def empty(type: pa.DataType) -> pa.Array:
    """An empty array of any type (``pa.array([])`` would ask pandas too)."""
    return pa.nulls(0, type)


def _bits(buffer, at: int, n: int) -> np.ndarray:
    return np.unpackbits(np.frombuffer(buffer, np.uint8), count=at + n, bitorder="little")[at:].astype(bool)


def _view(values: pa.Array) -> np.ndarray:
    """The data buffer of a numeric or bool array (null slots hold whatever is there)."""
    n, at = len(values), values.offset
    if pa.types.is_boolean(values.type):
        return _bits(values.buffers()[1], at, n) if n else np.zeros(0, bool)
    if values.type not in _DTYPES:
        raise TypeError(f"no numpy view of an Arrow {values.type} column")
    dtype = _DTYPES[values.type]
    if n == 0:
        return np.zeros(0, dtype)
    return np.frombuffer(values.buffers()[1], dtype, count=n, offset=at * dtype.itemsize)


def to_numpy(values: pa.Array | pa.ChunkedArray, fill=None) -> np.ndarray:
    """A numeric or bool Arrow column as numpy: a read-only view of its buffer (bools
    unpacked), as ``to_numpy`` gives, without its pandas import; nulls become ``fill``
    (a copy then), or are an error when it is None."""
    if isinstance(values, pa.ChunkedArray):
        values = values.combine_chunks()
    if not values.null_count:
        return _view(values)
    if fill is None:
        raise ValueError(f"a {values.type} column with {values.null_count} nulls has no numpy view here")
    return np.where(_bits(values.buffers()[0], values.offset, len(values)), _view(values), fill)


def strings(items: list[str]) -> pa.Array:
    """Python strings as an Arrow string array."""
    data = [s.encode() for s in items]
    offsets = np.concatenate([[0], np.cumsum([len(b) for b in data])]).astype(np.int32)
    return pa.Array.from_buffers(pa.string(), len(items), [None, pa.py_buffer(offsets), pa.py_buffer(b"".join(data))])
