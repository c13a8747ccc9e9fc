"""Arrow list columns <-> numpy matrices, without a Python object per row."""

from __future__ import annotations

import numpy as np
import pyarrow as pa


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
