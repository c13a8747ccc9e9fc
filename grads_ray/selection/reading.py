"""Reading the stages' tables for the select stage, each aligned to the scored ids' order.

The stages write their tables in parts, in whatever order their shards and workers finished; the
selection needs every per-row value at the row's place among the scored ids sorted (N rows, the
similarity stage's neighbour positions are in that order too). Everything here reads part by part
and puts each part's rows at their places, so the driver never holds a whole table besides the
result: a stats column (N,) (:class:`IdOrder`), the similarity stage's per-row columns (N,) and its
k-NN lists as blocks (:func:`similarity_inputs`), a feature column (N, *shape) float32, memory-mapped
when large (:func:`aligned_features`), the sources (N,) as dictionary codes (:func:`aligned_sources`).
Each checks that the parts hold exactly the scored ids. The select stage (grads_ray/stages/select.py)
says which of them a method reads.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from grads_ray import storage
from grads_ray.columns import SHAPE_KEY, id_positions, matrix
from grads_ray.data.readers import InputError
from grads_ray.evaluation.report import PLOTTED
from grads_ray.rundir import StageDir, read_parts
from grads_ray.selection.inputs import BASE_COLUMNS, Neighbours


class IdOrder:
    """A stage table's parts and where each of their rows goes in id order: ``ids`` (N,) sorted
    Arrow strings, ``position`` (N,) int64 (row r of the parts read in turn is the position[r]-th
    smallest id). Built from the id column alone, part by part; 8 bytes a row besides the ids."""

    def __init__(self, stage: StageDir, expect: pa.Array | None = None):
        self.stage, self.parts = stage, stage.parts()
        self.position, self.sizes, self.ids = id_positions(self.parts, sort=True)
        if expect is not None and not self.ids.equals(expect):
            raise RuntimeError(f"{stage.path.name} and the stats table hold different ids: rerun with a fresh output")

    def column(self, name: str) -> np.ndarray:
        """(N,) one column in id order (its type as numpy reads it: NaN for a missing value)."""
        out, offset = None, 0
        for p, m in zip(self.parts, self.sizes, strict=True):
            if m:
                out = _place(out, len(self.position), self.position[offset:offset + m],
                             pq.read_table(str(p), columns=[name])[name].to_numpy())
            offset += m
        return out if out is not None else np.zeros(0)


def _place(out: np.ndarray | None, n: int, positions: np.ndarray, values: np.ndarray) -> np.ndarray:
    """Put ``values`` at ``positions`` of an (n,) array made on first use with their type; a part
    whose values numpy reads as floats (an integer column with missing values) turns it to floats."""
    if out is None:
        out = np.empty(n, values.dtype)
    elif values.dtype.kind == "f" and out.dtype.kind in "iub":
        out = out.astype(np.float64)
    out[positions] = values
    return out


def similarity_inputs(stage: StageDir, ids: pa.Array) -> dict[str, Any]:
    """The similarity stage's per-row columns in the order of ``ids`` (dup_group, diversity,
    cluster) and its k-NN lists as :class:`Neighbours` read part by part in each pass (never whole:
    120 bytes a row at k = 10). Its ``position`` column gives each row's place; checked against
    ``ids`` here, in the one pass that reads the per-row columns."""
    parts = stage.parts()
    names = ("dup_group", "diversity", "cluster")
    seen = np.zeros(len(ids), bool)
    out: dict[str, Any] = dict.fromkeys(names)
    total, ok = 0, True
    for p in parts:
        t = pq.read_table(str(p), columns=["id", "position", *names])
        pos = t["position"].to_numpy()
        total += len(pos)
        if len(pos) and (total > len(ids) or pos.min() < 0 or pos.max() >= len(ids) or len(np.unique(pos)) < len(pos)
                         or seen[pos].any() or not ids.take(pa.array(pos)).equals(t["id"].combine_chunks())):
            ok = False
            break
        seen[pos] = True
        for c in names:
            out[c] = _place(out[c], len(ids), pos, t[c].to_numpy())
    if not ok or total != len(ids) or not seen.all():
        raise RuntimeError(f"{stage.path.name} and the stats table hold different ids: rerun with a fresh output")

    def blocks():
        for p in parts:
            t = pq.read_table(str(p), columns=["position", "nn_rows", "nn_sims"])
            yield t["position"].to_numpy(), matrix(t["nn_rows"], np.int64), matrix(t["nn_sims"])

    return {**out, "neighbours": Neighbours(blocks, len(ids))}


def aligned_features(stage: StageDir, ids: pa.Array, column: str, spill, limit_bytes: int,
                     legacy=None) -> np.ndarray:
    """(N, *shape) float32: a feature column of ``stage`` in the order of ``ids`` (the scored ids,
    sorted), read part by part, so the driver holds one part's rows at a time besides the result.
    The result is in memory when it takes at most ``limit_bytes``, else an ``np.memmap`` in the
    folder ``spill``. The per-row shape is the field's metadata; ``legacy(width)`` gives it for
    columns written before it was recorded (None: refused). Checks that the parts hold exactly
    the ids."""
    order = IdOrder(stage, expect=ids)
    out, offset = None, 0
    for p, m in zip(order.parts, order.sizes, strict=True):
        if m:
            t = pq.read_table(str(p), columns=[column])
            rows = matrix(t[column])
            if out is None:
                meta = t.schema.field(column).metadata or {}
                shape = tuple(json.loads(meta[SHAPE_KEY])) if SHAPE_KEY in meta else (legacy(rows.shape[1])
                                                                                     if legacy else None)
                if not shape or int(np.prod(shape)) != rows.shape[1]:
                    raise InputError(f"{stage.path.name}/: {column} rows of {rows.shape[1]} numbers carry no "
                                     "usable shape: rescore into a fresh output")
                size = len(ids) * rows.shape[1] * 4
                if size > limit_bytes:
                    spill.mkdir(parents=True, exist_ok=True)
                    out = np.memmap(spill / f"{column}.f32", np.float32, "w+", shape=(len(ids), rows.shape[1]))
                else:
                    out = np.empty((len(ids), rows.shape[1]), np.float32)
            out[order.position[offset:offset + m]] = rows
        offset += m
    if out is None:
        return np.zeros((len(ids), 0), np.float32)
    if isinstance(out, np.memmap):
        out.flush()
        return np.memmap(out.filename, np.float32, "r", shape=(len(ids), *shape))
    return out.reshape(len(ids), *shape)


def stats_columns(stats: StageDir, wanted: tuple[str, ...]) -> list[str]:
    """The stats columns to read: the base ones, the method's and the report's, those the table has
    (a 10^7-row table with every layer group's statistics would not fit in the driver's memory whole)."""
    parts = stats.parts()
    if not parts:
        return ["id", "loss", "n_tokens"]
    names = list(dict.fromkeys(c for p in parts for c in pq.read_schema(str(p)).names))  # an empty shard has fewer
    want = {"id", *BASE_COLUMNS, *wanted, *PLOTTED}
    return [c for c in names if c in want]


def aligned_sources(rows: StageDir, order: IdOrder) -> pa.DictionaryArray:
    """Each scored id's source (its input file, relative to the path given), in id order, as an
    Arrow dictionary array (4 bytes a row and the few names). Read shard by shard: the ids of a
    stats part are looked up in the ingested part of the same shard (the whole rows table is never
    read at once); ids that are not there (a run laid out otherwise) are looked up in all of it."""
    names: dict[str, int] = {}
    codes = np.full(len(order.ids), -1, np.int32)

    def code_of(source: pa.Array) -> np.ndarray:
        enc = source.dictionary_encode()
        local = np.array([names.setdefault(v, len(names)) for v in enc.dictionary.to_pylist()], np.int32)
        return local[enc.indices.to_numpy(zero_copy_only=False)] if len(local) else np.zeros(0, np.int32)

    offset = 0
    for p, m in zip(order.parts, order.sizes, strict=True):
        if m:
            ids = pq.read_table(str(p), columns=["id"])["id"].combine_chunks()
            same = rows.path / Path(str(p)).name
            if storage.location(same).exists():
                t = pq.read_table(str(same), columns=["id", "source"])
                at = pc.index_in(ids, value_set=t["id"].combine_chunks())
                if at.null_count == 0:
                    codes[order.position[offset:offset + m]] = code_of(t["source"].combine_chunks().take(at))
        offset += m
    if (codes < 0).any():
        t = read_parts(rows.parts(), ["id", "source"])
        missing = np.flatnonzero(codes < 0)
        at = pc.index_in(order.ids.take(pa.array(missing)), value_set=t["id"].combine_chunks())
        codes[missing] = code_of(t["source"].combine_chunks().take(at).fill_null(""))
    return pa.DictionaryArray.from_arrays(pa.array(codes), pa.array(list(names), pa.string()))
