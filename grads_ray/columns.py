"""Column helpers that ingest, scoring, similarity and selection share, without a Python object per
row: Arrow list columns <-> numpy matrices (per-row shapes in the field metadata), a seeded hash of
each id, each row's place in id order, and which rows' statistics are usable."""

from __future__ import annotations

import json

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

SHAPE_KEY = b"shape"  # field metadata: the shape of each row's values, as a JSON list

ROW_GROUP_ROWS = 1024  # rows per Parquet row group of a rows part: the scorer reads its units by group
ROWS_SCHEMA = pa.schema([("id", pa.string()), ("shard", pa.int32()), ("source", pa.string()),
                         ("line", pa.int64()), ("record", pa.string())])  # ingest's rows table, read by scoring


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


_FNV_OFFSET = np.uint64(0xCBF29CE484222325)
_FNV_PRIME = np.uint64(0x100000001B3)
ID_HASH_BLOCK = 1 << 16  # id_hash: rows hashed at a time


def _splitmix(h: np.ndarray) -> np.ndarray:
    """The splitmix64 finaliser: every input bit moves every output bit. uint64 -> uint64."""
    with np.errstate(over="ignore"):
        h = (h ^ (h >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
        h = (h ^ (h >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
        return h ^ (h >> np.uint64(31))


def id_hash(ids: pa.Array | pa.ChunkedArray | list[str], seed: int) -> np.ndarray:
    """A seeded 64-bit hash of each id (FNV-1a over its UTF-8 bytes, then splitmix64), read straight
    from Arrow's buffers. It depends on the id and the seed only, never on row order, shards or the
    other ids, so ties break the same way however the corpus was split. (N,) -> (N,) uint64."""
    arr = ids if isinstance(ids, (pa.Array, pa.ChunkedArray)) else pa.array(ids, pa.string())
    arr = arr.combine_chunks() if isinstance(arr, pa.ChunkedArray) else arr
    if not (pa.types.is_string(arr.type) or pa.types.is_large_string(arr.type)):
        arr = arr.cast(pa.string())
    n = len(arr)
    if n == 0:
        return np.zeros(0, np.uint64)
    _, off_buf, data_buf = arr.buffers()  # the offsets as they are (32 or 64 bits): no copy of the ids
    width = 8 if pa.types.is_large_string(arr.type) else 4
    offsets = np.frombuffer(off_buf, np.int64 if width == 8 else np.int32, n + 1, arr.offset * width)
    data = np.frombuffer(data_buf, np.uint8) if data_buf is not None else np.zeros(0, np.uint8)
    start0 = _FNV_OFFSET ^ _splitmix(np.array([seed & 0xFFFFFFFFFFFFFFFF], np.uint64))[0]
    out = np.empty(n, np.uint64)
    for a in range(0, n, ID_HASH_BLOCK):  # each id's hash is its own: blocks bound the temporaries
        b = min(a + ID_HASH_BLOCK, n)
        off = offsets[a:b + 1].astype(np.int64)
        start, length = off[:-1], np.diff(off)
        h = np.full(b - a, start0, np.uint64)
        longest_first = np.argsort(-length, kind="stable")
        desc = length[longest_first]
        with np.errstate(over="ignore"):
            for j in range(int(length.max(initial=0))):  # byte j of every id longer than j: Σ lengths in all
                live = longest_first[:int(np.searchsorted(-desc, -j, side="left"))]
                h[live] = (h[live] ^ data[start[live] + j].astype(np.uint64)) * _FNV_PRIME
        out[a:b] = _splitmix(h)
    return out


def id_positions(parts: list, sort: bool = False) -> tuple[np.ndarray, list[int], pa.Array | None]:
    """Where each row of the Parquet ``parts`` (read in turn) goes in id order, from their ``id``
    column alone. -> (position, sizes, ids): position (N,) int64, row r of the parts is the
    position[r]-th smallest id (equal ids keep their reading order: Arrow's sort is stable); sizes,
    each part's rows; ids, the (N,) ids sorted (Arrow strings) when ``sort``, else None. 8 bytes a
    row besides the ids. The similarity stage's pass 0 and the select stage's reading share it."""
    read = [pq.read_table(str(p), columns=["id"])["id"] for p in parts]
    sizes = [len(c) for c in read]
    chunks = [c for col in read for c in col.chunks]
    del read
    if sort:  # one array: Arrow's sort and take of a chunked array would make more copies of every id
        ids = pa.concat_arrays(chunks) if chunks else pa.array([], pa.string())
    else:  # the chunks as read, no copy of them
        ids = pa.chunked_array(chunks, chunks[0].type if chunks else pa.string())
    del chunks
    order = pc.sort_indices(ids)
    ids = ids.take(order) if sort else None  # the sorted ids replace those read
    position = np.empty(len(order), np.int64)
    position[order.to_numpy()] = np.arange(len(order))
    return position, sizes, ids


def finite_mask(columns: dict[str, np.ndarray]) -> np.ndarray:
    """(N,) True where the row is usable: the score stage's ``finite`` flag when given, and a finite
    loss and gradient statistics among the columns passed."""
    ok = np.ones(len(columns["loss"]), dtype=bool)
    if "finite" in columns:
        ok &= np.asarray(columns["finite"], dtype=bool)
    for name in columns:  # by name: columns may be read on demand, only these are
        stat = name.rsplit(".", 1)[-1]
        if name == "loss" or stat.startswith("grad_"):
            ok &= np.isfinite(np.asarray(columns[name], dtype=np.float64))
    return ok
