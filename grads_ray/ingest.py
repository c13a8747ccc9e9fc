"""Ingest: corpus shards -> validated rows (``rows/part-*.parquet``) and rejects, one Ray task a shard.

Each task reads its shard, validates every row and writes, atomically, the rows table
(``id, shard, source, line, record``: ``record`` is the original row as JSON text) and the shard's
rejects; the completion marker comes last. Finished shards are skipped on a rerun.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pyarrow as pa

from grads_ray.data.readers import Shard, read_shard, validate_rows
from grads_ray.rundir import StageDir, write_jsonl, write_parquet

ROWS_SCHEMA = pa.schema([("id", pa.string()), ("shard", pa.int32()), ("source", pa.string()),
                         ("line", pa.int64()), ("record", pa.string())])


def node_id() -> str:
    """The Ray node this process runs on ("" outside Ray): ledgers record where each shard ran."""
    import ray

    return ray.get_runtime_context().get_node_id() if ray.is_initialized() else ""


def ingest_shard(shard: Shard, rows_dir: str) -> dict[str, Any]:
    """Read and validate one shard, write its parts and marker. -> counts for the ledger."""
    stage = StageDir(Path(rows_dir).parent, Path(rows_dir).name)
    good, bad = [], []
    for item in validate_rows(read_shard(shard)):
        (bad if "reason" in item else good).append(item)
    table = pa.table({
        "id": [r["id"] for r in good], "shard": [shard.index] * len(good),
        "source": [r["source"] for r in good], "line": [r["line"] for r in good],
        "record": [r["record"] for r in good]}, schema=ROWS_SCHEMA)
    write_parquet(stage.part(shard.index), table)
    write_jsonl(stage.part(shard.index, "rejected.jsonl"), [{**r, "stage": "ingest"} for r in bad])
    info = {"shard": shard.index, "rows": len(good), "rejected": len(bad),
            "first_reject": bad[0] if bad else None, "node": node_id()}
    stage.mark_done(shard.index, info)
    return info


def run_ingest(shards: list[Shard], stage: StageDir) -> list[dict[str, Any]]:
    """Ingest every shard not yet marked done, as parallel Ray tasks. -> every shard's ledger entry."""
    import ray

    from grads_ray.data.readers import InputError

    task = ray.remote(num_cpus=1, max_retries=3)(ingest_shard)
    pending = [s for s in shards if not stage.is_done(s.index)]
    refs = {task.remote(s, str(stage.path)): s for s in pending}
    for ref, shard in refs.items():
        try:
            ray.get(ref)
        except ray.exceptions.RayTaskError as err:  # a file that breaks while read: name it, no Ray traceback
            cause = err.cause if getattr(err, "cause", None) is not None else err
            raise InputError(f"{shard.path} (rows from line {shard.first_line}): cannot be read: "
                             f"{type(cause).__name__}: {str(cause).splitlines()[0] if str(cause) else ''}") from None
    return [stage.done_info(s.index) for s in shards]
