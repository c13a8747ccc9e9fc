"""The ingest stage's Ray tasks: corpus shards -> validated rows (``rows/part-*.parquet``) and rejects, one Ray task a shard.

Each task reads its shard, validates every row and writes, atomically, the rows table
(``id, shard, source, line, record``: ``record`` is the original row as JSON text) and the shard's
rejects; the completion marker comes last. Finished shards are skipped on a rerun.
"""

from __future__ import annotations

import hashlib
import json
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from grads_ray import storage
from grads_ray.columns import ROW_GROUP_ROWS, ROWS_SCHEMA, id_hash
from grads_ray.data.readers import Shard, read_shard, validate_rows
from grads_ray.resources import node_id
from grads_ray.rundir import StageDir, write_jsonl, write_parquet

DEDUP_SEED = 0x1D5  # drop_duplicate_ids' id hash: any fixed value (the hash only proposes candidates)


def rows_digest(table: pa.Table) -> str:
    """sha256 of a shard's rows (id, source, line, record): the same rows give the same digest,
    whatever shard number or corpus version they come in, so their scores can be reused."""
    h = hashlib.sha256()
    for row in zip(*(table[c].to_pylist() for c in ("id", "source", "line", "record")), strict=True):
        h.update(json.dumps(row, ensure_ascii=False).encode())
        h.update(b"\n")
    return h.hexdigest()


def ingest_shard(shard: Shard, rows_dir: str) -> dict[str, Any]:
    """Read and validate one shard, write its parts and marker. -> counts for the ledger."""
    loc = storage.location(rows_dir)  # a folder or a URL
    stage = StageDir(loc.parent, loc.name)
    good, bad = [], []
    for item in validate_rows(read_shard(shard)):
        (bad if "reason" in item else good).append(item)
    table = pa.table({
        "id": [r["id"] for r in good], "shard": [shard.index] * len(good),
        "source": [r["source"] for r in good], "line": [r["line"] for r in good],
        "record": [r["record"] for r in good]}, schema=ROWS_SCHEMA)
    write_parquet(stage.part(shard.index), table, row_group_size=ROW_GROUP_ROWS)
    write_jsonl(stage.rejects(shard.index), [{**r, "stage": "ingest"} for r in bad])
    info = {"shard": shard.index, "rows": len(good), "rejected": len(bad),
            "first_reject": bad[0] if bad else None, "node": node_id(), "content": rows_digest(table)}
    stage.mark_done(shard.index, info)
    return info


def run_ingest(shards: list[Shard], stage: StageDir, progress=None) -> list[dict[str, Any]]:
    """Ingest every shard not yet marked done, as parallel Ray tasks; ``progress(1)`` as each
    finishes. -> every shard's ledger entry."""
    import ray

    from grads_ray.data.readers import InputError

    task = ray.remote(num_cpus=1, max_retries=3)(ingest_shard)
    pending = [s for s in shards if not stage.is_done(s.index)]
    refs = {task.remote(s, str(stage.path)): s for s in pending}
    left = list(refs)
    while left:
        ready, left = ray.wait(left, num_returns=1)
        ref, shard = ready[0], refs[ready[0]]
        try:
            ray.get(ref)
            if progress:
                progress(1)
        except ray.exceptions.RayTaskError as err:  # a file that breaks while read: name it, no Ray traceback
            cause = err.cause if getattr(err, "cause", None) is not None else err
            raise InputError(f"{shard.path} (rows from line {shard.first_line}): cannot be read: "
                             f"{type(cause).__name__}: {str(cause).splitlines()[0] if str(cause) else ''}") from None
    return [stage.done_info(s.index) for s in shards]


def drop_duplicate_ids(shards: list[Shard], stage: StageDir) -> int:
    """Ids must be unique (every later stage joins on them): keep each id's first row in input order
    (shard, line) and move every later one to its shard's rejects as ``duplicate_id``, naming where
    the id was first seen. Idempotent, so an interrupted ingest can run it again. -> rows moved.

    The driver never holds the corpus's ids. It reads the parts one at a time and keeps, a row, a
    64-bit hash of the id (``id_hash`` with the fixed seed ``DEDUP_SEED``), its shard and its line:
    20 bytes; while they are sorted, the order (8 bytes) and the sort's buffers come on top, about
    37 MB in all at 10^6 rows, where sorting the ids themselves took about 190 MB. Rows whose hash
    another row shares are only candidates, since two different ids can share a hash: their real
    ids, read back from just those rows of their parts, decide, so a collision never drops a row.
    The candidates are the duplicates and their first rows (a collision of two distinct ids is a
    2^-64 chance a pair, about 3e-8 a corpus of 10^6 rows)."""
    parts = [stage.part(s.index) for s in shards]
    sizes = [pq.read_metadata(str(p)).num_rows for p in parts]
    n = sum(sizes)
    if n < 2:
        return 0
    h, shard_col, line_col = np.empty(n, np.uint64), np.empty(n, np.int32), np.empty(n, np.int64)
    at = 0
    for p, size in zip(parts, sizes, strict=True):
        t = pq.read_table(str(p), columns=["id", "shard", "line"])
        h[at:at + size] = id_hash(t["id"], DEDUP_SEED)
        shard_col[at:at + size], line_col[at:at + size] = t["shard"].to_numpy(), t["line"].to_numpy()
        at += size
        del t
    order = np.lexsort((line_col, shard_col, h))  # by (hash, shard, line)
    h.sort()  # == h[order], the hash being the first key: sorted in place, no second copy
    same = h[1:] == h[:-1]
    if not same.any():
        return 0
    shared = np.zeros(n, dtype=bool)  # the rows whose hash another row has: both ends of each pair
    shared[1:] = same
    shared[:-1] |= same
    cand = order[shared]
    del h, order, same, shared
    cand_shard, cand_line = shard_col[cand], line_col[cand]
    del shard_col, line_col, cand
    pieces = []
    for index in np.unique(cand_shard):  # the candidates' real ids, from their parts: one read a part
        part = pq.read_table(str(stage.part(int(index))), columns=["id", "shard", "line"])
        pieces.append(part.filter(pc.is_in(part["line"], value_set=pa.array(cand_line[cand_shard == index]))))
        del part
    t = pa.concat_tables(pieces).sort_by([("id", "ascending"), ("shard", "ascending"), ("line", "ascending")])
    ids = t["id"].combine_chunks()
    same = np.zeros(t.num_rows, dtype=bool)
    same[1:] = pc.equal(ids.slice(1), ids.slice(0, len(ids) - 1)).to_numpy(zero_copy_only=False)
    if not same.any():
        return 0  # hash collisions only
    first = np.maximum.accumulate(np.where(~same, np.arange(t.num_rows), 0))  # each run's first row
    shard_col, line_col = t["shard"].to_numpy(), t["line"].to_numpy()
    by_shard: dict[int, dict[int, str]] = {}
    for i in np.flatnonzero(same):
        j = first[i]
        seen = f"{shards[int(shard_col[j])].source}:{int(line_col[j])}"
        by_shard.setdefault(int(shard_col[i]), {})[int(line_col[i])] = seen
    for index, lines in by_shard.items():
        rows = pq.read_table(str(stage.part(index)))
        drop = pc.is_in(rows["line"], value_set=pa.array(list(lines), pa.int64()))
        gone = rows.filter(drop).select(["id", "source", "line"]).to_pylist()
        rejects_path = stage.rejects(index)
        rejects = [json.loads(x) for x in rejects_path.read_text().splitlines() if x.strip()] \
            if rejects_path.exists() else []
        rejects += [{**r, "reason": "duplicate_id", "detail": f"first seen at {lines[r['line']]}", "stage": "ingest"}
                    for r in gone]
        write_jsonl(rejects_path, sorted(rejects, key=lambda r: r["line"]))
        kept = rows.filter(pc.invert(drop))
        write_parquet(stage.part(index), kept, row_group_size=ROW_GROUP_ROWS)
        info = stage.done_info(index)
        stage.mark_done(index, {**info, "rows": info["rows"] - len(gone), "rejected": info["rejected"] + len(gone),
                                "first_reject": min(rejects, key=lambda r: r["line"]), "content": rows_digest(kept)})
    return int(same.sum())
