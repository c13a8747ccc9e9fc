"""ingest: the corpus files -> validated rows (``rows/part-*.parquet``) and rejects, one Ray task a shard.

1. plan shards (JSONL byte ranges, Parquet/dataset row ranges; each at most ``data.shard_rows`` rows) and keep the plan in ``rows/.ledger/shards.json``;
2. read and validate each unfinished shard in a Ray task (grads_ray/stages/ingest_tasks.py);
3. move rows whose id was seen before to the rejects (``duplicate_id``);
4. record counts, input hashes and empty input files.
Later stages receive a :class:`Corpus`: the rows folder and its shards.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from typing import Any

from grads_ray.data.readers import Shard, file_digest, plan_shards
from grads_ray.progress import Progress
from grads_ray.rundir import StageDir, read_json, write_json
from grads_ray.stages.base import Done, Outputs, Stage, first_reject, no_rows, strict_error

log = logging.getLogger("grads_ray")


@dataclass
class Corpus:
    """The ingested corpus: ``rows`` (one part a shard: ``id, shard, source, line, record``) and the
    shard plan."""

    rows: StageDir
    shards: list[Shard]


class Ingest(Stage):
    name, folders, private = "ingest", ("rows",), ("input_sha256",)
    about = "read and validate the corpus: rows/, rejects"

    def settings(self, cfg) -> tuple:
        d = cfg.data
        stat = [(p, os.path.getsize(p) if os.path.isfile(p) else None, os.path.getmtime(p))
                for p in d.paths if os.path.exists(p)]
        return d.paths, stat, d.shard_bytes, d.shard_rows, d.limit

    def run(self, ctx, out: Outputs) -> dict[str, Any]:
        from grads_ray.data.readers import empty_inputs
        from grads_ray.stages.ingest_tasks import drop_duplicate_ids, run_ingest

        d, rows = ctx.cfg.data, out["rows"]
        shards = plan_shards(d.paths, d.shard_bytes, d.shard_rows, d.limit)
        write_json(rows.ledger / "shards.json", [s.to_dict() for s in shards])
        ctx.ray()
        todo = [sh for sh in shards if not rows.is_done(sh.index)]
        bar = Progress("ingest", len(shards), "shards", done=len(shards) - len(todo))
        run_ingest(shards, rows, progress=bar.update)
        bar.close()
        duplicates = drop_duplicate_ids(shards, rows)
        infos = [rows.done_info(s.index) for s in shards]
        empty = empty_inputs(d.paths, shards) if not d.limit else []
        if empty:
            log.warning("[grads-ray] ingest: %d input file(s) hold no row: %s", len(empty), ", ".join(empty[:5]))
        return {"shards": len(shards), "rows": sum(i["rows"] for i in infos),
                "rejected": sum(i["rejected"] for i in infos), "input_sha256": {p: file_digest(p) for p in d.paths},
                "duplicate_ids": duplicates, "empty_inputs": empty,
                "nodes": sorted({i.get("node", "") for i in infos} - {""})}

    def value(self, ctx, out: Outputs, info: dict[str, Any]) -> Corpus:
        rows = out["rows"]
        return Corpus(rows, [Shard(**s) for s in read_json(rows.ledger / "shards.json")])

    def report(self, ctx, done: Done) -> dict[str, Any]:
        return {"inputs": done.info["input_sha256"]}

    def check(self, ctx, done: Done) -> None:
        if ctx.cfg.data.strict and done.info["rejected"]:
            raise strict_error(done["rows"])
        if done.info["rows"] == 0:
            first = first_reject(done["rows"])
            where = f"; first: {first['source']}:{first['line']}: {first['reason']}" if first else ""
            no_rows(ctx, f"ingest: no usable row in data.paths ({done.info['rejected']} rejected{where})")
