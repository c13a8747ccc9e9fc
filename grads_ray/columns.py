"""Arrow list columns <-> numpy matrices, without a Python object per row."""

from __future__ import annotations

import json

import numpy as np
import pyarrow as pa

SHAPE_KEY = b"shape"  # field metadata: the shape of each row's values, as a JSON list


def matrix(column: pa.ChunkedArray | pa.Array, dtype=np.float32) -> np.ndarray:
    """A list column of equal-length rows -> (N, w) array."""
    arr = column.combine_chunks() if isinstance(column, pa.ChunkedArray) else column
    n = len(arr)
    if n == 0:
        return np.zeros((0, 0), dtype)
    flat = arr.flatten().to_numpy(zero_copy_only=False).astype(dtype, copy=False)
    return np.ascontiguousarray(flat.reshape(n, -1)) if flat.size else np.zeros((n, 0), dtype)


def lists(matrix: np.ndarray) -> pa.LargeListArray:
    """(N, k) -> a list column of N rows of k values each (k may be 0); 64-bit offsets, so N·k may
    pass 2^31."""
    n, k = matrix.shape
    return pa.LargeListArray.from_arrays(pa.array(np.arange(n + 1, dtype=np.int64) * k), pa.array(matrix.reshape(-1)))


def shaped_field(name: str, shape: tuple[int, ...]) -> pa.Field:
    """A float32 list column whose rows are arrays of ``shape``, flattened; the shape travels in the
    field's metadata (kept by Parquet), so readers need not guess it."""
    return pa.field(name, pa.list_(pa.float32()), metadata={SHAPE_KEY: json.dumps(list(shape)).encode()})


def tensor(table: pa.Table, name: str, dtype=np.float32) -> np.ndarray:
    """A column written with :func:`shaped_field` -> (N, *shape)."""
    meta = table.schema.field(name).metadata or {}
    if SHAPE_KEY not in meta:
        raise ValueError(f"column {name!r} carries no shape in its metadata (written by an older grads-ray: "
                         "rescore, and delete the score cache)")
    m = matrix(table[name], dtype)
    return m.reshape(len(m), *json.loads(meta[SHAPE_KEY]))
