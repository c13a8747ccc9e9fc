"""Writing the select stage's outputs: ``selection.parquet`` and the selected rows.

- :func:`write_selection`: every scored id (N,) with each result column (its verdict, rank and score
  components), a row group at a time;
- :func:`write_selected`: the selected rows' original records, in rank order for the user
  (``selected.jsonl``, ``selected.parquet``) and shuffled (seeded) as the select stage's parts,
  which the fine-tune reads (:func:`selected_rows`). Out of core: the records of 10^7 rows are GBs,
  so they are dealt into spill buckets in one pass over the ingested parts, then each bucket is
  sorted and appended; an id's rank is found through a sorted array of 64-bit id hashes
  (:func:`rank_lookup`), not a hash table of every ranked id rebuilt for each part.
"""

from __future__ import annotations

import shutil
import tempfile
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from grads_ray import storage
from grads_ray.columns import id_hash
from grads_ray.rundir import StageDir, write_parquet
from grads_ray.selection.spill import ColumnSpill

SELECTION_ROW_GROUP = 1 << 16  # selection.parquet's row groups: the writer encodes one at a time
MAX_BUCKETS = 64  # write_selected: at most this many spill files per order, open at once


def write_selection(path, ids: pa.Array, res) -> None:
    """``selection.parquet``: every scored id and each result column of ``res`` (a mapping, e.g. a
    :class:`ColumnSpill`), written a row group at a time from slices of the columns, so that only
    one row group's values are in memory besides the ids."""
    names = list(res)

    def piece(a: int, b: int) -> pa.Table:
        cols = {k: (res.rows(k, a, b) if isinstance(res, ColumnSpill) else np.asarray(res[k])[a:b]) for k in names}
        return pa.table({"id": ids.slice(a, b - a), **{k: pa.array(v) for k, v in cols.items()}})

    def write(fh) -> None:
        first = piece(0, min(len(ids), SELECTION_ROW_GROUP))
        with pq.ParquetWriter(fh, first.schema) as w:
            if len(ids):
                w.write_table(first)
            for a in range(SELECTION_ROW_GROUP, len(ids), SELECTION_ROW_GROUP):
                w.write_table(piece(a, min(a + SELECTION_ROW_GROUP, len(ids))).cast(first.schema))

    storage.atomic_write(storage.location(path), write)


def write_selected(jsonl_path, parquet_path, subset: StageDir, rows: StageDir, ranked_ids: pa.Array, *, seed: int,
                   part_rows: int, spill: Path | None = None, bucket_rows: int | None = None) -> None:
    """The original rows of the selected ids (``ranked_ids``: in rank order):

    - ``jsonl_path`` (one JSON record a line, as read: ``selected.jsonl``) and ``parquet_path`` (id,
      rank, record: ``selected.parquet``), in rank order, for the user;
    - ``subset`` (the select stage's folder): the same rows in a seeded random order, in parts of
      ``part_rows``: what the fine-tune reads, so its data path costs O(selected rows) per epoch.

    Out of core (the selected records of 10^7 rows are GBs): one pass over the ingested parts
    deals each selected row into a bucket by rank and into one by shuffled position (Arrow IPC
    files under ``spill``, a local folder; a temporary one if None), at most :data:`MAX_BUCKETS`
    per order, of ``bucket_rows`` rows (rounded up to a multiple of ``part_rows``; default: the
    smallest that keeps within that count); then each bucket, sorted in memory, is appended to the outputs. The driver holds one
    ingested part or one bucket of records at a time, plus 8 bytes a selected row. Records stay
    Arrow strings (no Python object per row)."""
    ranked_ids = ranked_ids.cast(pa.string())
    n = len(ranked_ids)
    if bucket_rows is None:
        bucket_rows = part_rows * max(1, -(-n // (part_rows * MAX_BUCKETS)))
    bucket_rows = part_rows * max(1, -(-bucket_rows // part_rows))  # whole parts a bucket: rounded up
    n_buckets = max(1, -(-n // bucket_rows))
    slot = np.empty(n, np.int64)  # rank r -> its position in the shuffled order
    slot[np.random.default_rng([seed, 0x5E1EC7]).permutation(n)] = np.arange(n)
    own = spill is None
    spill = Path(tempfile.mkdtemp(prefix="grads-ray-selected-")) if own else Path(spill) / "selected"
    spill.mkdir(parents=True, exist_ok=True)
    schema = pa.schema([pa.field("id", pa.string()), pa.field("rank", pa.int64()), pa.field("record", pa.string())])
    try:
        found = _deal_selected(rows, ranked_ids, slot, bucket_rows, spill, schema)
        if found.sum() != n:
            missing = ranked_ids[int(np.argmin(found))].as_py()
            raise RuntimeError(f"{n - int(found.sum())} selected ids have no ingested row (first: {missing!r})")
        del found

        def in_rank_order():
            for b in range(n_buckets):
                t = _read_bucket(spill / f"rank-{b:05d}.arrow", schema)
                yield t.take(pc.sort_indices(t["rank"]))

        def jsonl(fh) -> None:
            for t in in_rank_order():
                for batch in t.to_batches(max_chunksize=10_000):
                    fh.write("".join(r + "\n" for r in batch["record"].to_pylist()).encode())

        def parquet(fh) -> None:
            with pq.ParquetWriter(fh, schema) as w:
                for t in in_rank_order():
                    if t.num_rows:
                        w.write_table(t)

        storage.atomic_write(storage.location(jsonl_path), jsonl)
        storage.atomic_write(storage.location(parquet_path), parquet)
        for b in range(n_buckets):  # bucket_rows is a multiple of part_rows: whole parts per bucket
            t = _read_bucket(spill / f"slot-{b:05d}.arrow", schema, with_slot=True)
            t = t.take(pc.sort_indices(t["slot"]))
            first = b * bucket_rows // part_rows
            for k in range(-(-t.num_rows // part_rows)):
                write_parquet(subset.part(first + k), t.slice(k * part_rows, part_rows).select(schema.names))
    finally:
        shutil.rmtree(spill, ignore_errors=True)


def _deal_selected(rows: StageDir, ranked_ids: pa.Array, slot: np.ndarray, bucket_rows: int, spill: Path,
                   schema: pa.Schema) -> np.ndarray:
    """write_selected's one pass over the ingested parts: each selected row (id, rank, record) is
    appended to ``rank-B.arrow`` (B = rank // bucket_rows) and, with its shuffled position
    ``slot``, to ``slot-B.arrow``. -> (n,) bool: which ranks were found."""
    found = np.zeros(len(ranked_ids), bool)
    writers: dict[str, pa.ipc.RecordBatchFileWriter] = {}
    slot_schema = schema.append(pa.field("slot", pa.int64()))

    def append(name: str, table: pa.Table, key: np.ndarray) -> None:
        order = np.argsort(key, kind="stable")
        key, table = key[order], table.take(pa.array(order))
        cuts = np.flatnonzero(np.diff(key)) + 1
        for lo, hi in zip(np.r_[0, cuts], np.r_[cuts, len(key)], strict=True):
            file = f"{name}-{int(key[lo]):05d}.arrow"
            if file not in writers:
                writers[file] = pa.ipc.new_file(str(spill / file), table.schema)
            writers[file].write_table(table.slice(lo, hi - lo))

    rank_of = rank_lookup(ranked_ids)
    try:
        for part in rows.parts():
            t = pq.read_table(str(part), columns=["id", "record"])
            rank = rank_of(t["id"].combine_chunks())
            keep = rank >= 0
            if not keep.any():
                continue
            rank = rank[keep]
            t = t.filter(pa.array(keep))
            found[rank] = True
            t = pa.table([t["id"], pa.array(rank), t["record"]], schema=schema)
            append("rank", t, rank // bucket_rows)
            append("slot", t.append_column("slot", pa.array(slot[rank])).cast(slot_schema), slot[rank] // bucket_rows)
    finally:
        for w in writers.values():
            w.close()
    return found


RANK_HASH_SEED = 0x5E1EC7ED  # rank_lookup's id hash: any fixed value (it only proposes candidates)


def rank_lookup(ranked_ids: pa.Array):
    """-> ``rank_of(ids)``: each id's position in ``ranked_ids`` ((m,) int64, -1 where absent).

    One sorted array of the ranked ids' 64-bit hashes (8 bytes an id, built once) and a binary search
    a lookup, each hit confirmed by comparing the ids themselves; Arrow's ``index_in`` would rebuild
    its hash table of every ranked id for each part (1.2 s a part of 10,000 rows against 2.5 million
    ranked ids here: minutes over a 10^7-row corpus). Two ranked ids that share a hash (about 2·10^-7
    at 2.5 million) make it fall back to ``index_in``."""
    h = id_hash(ranked_ids, RANK_HASH_SEED)
    order = np.argsort(h, kind="stable")
    h = h[order]
    if len(h) > 1 and (h[1:] == h[:-1]).any():
        return lambda ids: pc.index_in(ids, value_set=ranked_ids).fill_null(-1).to_numpy().astype(np.int64)

    def rank_of(ids: pa.Array) -> np.ndarray:
        out = np.full(len(ids), -1, np.int64)
        if not len(h) or not len(ids):
            return out
        hp = id_hash(ids, RANK_HASH_SEED)
        at = np.minimum(np.searchsorted(h, hp), len(h) - 1)
        hit = np.flatnonzero(h[at] == hp)
        rank = order[at[hit]]
        same = pc.equal(ranked_ids.take(pa.array(rank)), ids.take(pa.array(hit))).to_numpy(zero_copy_only=False)
        out[hit[same]] = rank[same]
        return out

    return rank_of


def _read_bucket(path: Path, schema: pa.Schema, with_slot: bool = False) -> pa.Table:
    """One spill bucket of write_selected (empty when no selected row fell into it)."""
    if with_slot:
        schema = schema.append(pa.field("slot", pa.int64()))
    if not path.exists():
        return schema.empty_table()
    with pa.OSFile(str(path)) as src:  # read, not mapped: the bucket's pages leave with the table
        return pa.ipc.open_file(src).read_all()


def selected_rows(subset: StageDir) -> list[str]:
    """The fine-tune's input: the select stage's parts (the selected rows, shuffled once, seeded)."""
    return [str(p) for p in subset.parts()]
