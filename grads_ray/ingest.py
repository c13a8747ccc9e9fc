"""Ingest: corpus shards -> validated rows (``rows/part-*.parquet``) and rejects, one Ray task a shard.

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
from grads_ray.data.readers import Shard, read_shard, validate_rows
from grads_ray.rundir import StageDir, write_jsonl, write_parquet

ROW_GROUP_ROWS = 1024  # rows per Parquet row group of a rows part: the scorer reads its units by group
ROWS_SCHEMA = pa.schema([("id", pa.string()), ("shard", pa.int32()), ("source", pa.string()),
                         ("line", pa.int64()), ("record", pa.string())])


def node_id() -> str:
    """The Ray node this process runs on ("" outside Ray): ledgers record where each shard ran."""
    import ray

    return ray.get_runtime_context().get_node_id() if ray.is_initialized() else ""


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
    the id was first seen. Idempotent, so an interrupted ingest can run it again. -> rows moved."""
    parts = [stage.part(s.index) for s in shards]
    t = pa.concat_tables([pq.read_table(str(p), columns=["id", "shard", "line"]) for p in parts])
    if t.num_rows < 2:
        return 0
    t = t.sort_by([("id", "ascending"), ("shard", "ascending"), ("line", "ascending")])
    ids = t["id"].combine_chunks()
    same = np.zeros(t.num_rows, dtype=bool)
    same[1:] = pc.equal(ids.slice(1), ids.slice(0, len(ids) - 1)).to_numpy(zero_copy_only=False)
    if not same.any():
        return 0
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
