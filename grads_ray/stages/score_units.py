"""The score stage's units of work: a shard's rows in runs of ``8 * score.batch_size`` (a rerun keeps
the size its written units were cut in, and under ``auto`` their batch size: :func:`unit_layout`), read and
tokenized in CPU tasks, packed as one item each (Arrow IPC bytes), so that a scorer is handed exactly
one unit per call whatever blocks Ray Data forms; then, scored, written as unit files under
``stats/.ledger/units/SSSSS/AAAAAAAAA.parquet``, and merged per shard into the public tables.

A unit's numbers depend on its rows alone, so a rerun scores only the units not yet written and a
resumed run is bit-identical to an uninterrupted one (grads_ray/stages/score_pass.py runs the pass).
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from grads_ray.columns import ROWS_SCHEMA
from grads_ray.data.tokenize import tokenize_batch
from grads_ray.gradients.scorer import FEATURE_COLUMNS, ROWS_PER_BLOCK_BATCHES, STAT_BASE, finite_rows
from grads_ray.rundir import StageDir, write_jsonl, write_parquet

ROW_COLUMNS = ROWS_SCHEMA.names  # the ingested rows table


def read_slice(path: str, start: int, stop: int) -> pa.Table:
    """Rows ``[start, stop)`` of a rows part, decoding only the row groups that hold them (ingest
    writes groups of ``grads_ray.columns.ROW_GROUP_ROWS``)."""
    import pyarrow.parquet as pq

    f = pq.ParquetFile(path)
    groups, offset, first = [], 0, None
    for g in range(f.metadata.num_row_groups):
        n = f.metadata.row_group(g).num_rows
        if offset < stop and offset + n > start:
            groups.append(g)
            first = offset if first is None else first
        offset += n
    if not groups:
        return ROWS_SCHEMA.empty_table()
    return f.read_row_groups(groups, columns=ROW_COLUMNS).slice(start - first, stop - start)


def read_unit(path: str, start: int, unit_rows: int) -> pa.Table:
    """A unit of work -> rows ``[start, start + unit_rows)`` of the rows part ``path``, each with
    ``pos``, its index in the shard. Units start at multiples of ``unit_rows`` whatever else is being
    scored, and the scorer cuts its batches inside units, so a row's batch mates never depend on
    which shards a run had left to do."""
    t = read_slice(path, start, start + unit_rows)
    return t.append_column("pos", pa.array(np.arange(start, start + t.num_rows, dtype=np.int64)))


UNIT_COLUMNS = ("id", "source", "line", "pos", "reason", "detail", "truncated")


def pack_unit(tokenized: dict[str, Any]) -> bytes:
    """A tokenized unit (:func:`tokenize_batch`'s output) -> Arrow IPC bytes: one item, so Ray Data
    hands it to a scorer whole, never split or merged with another."""
    cols = {c: pa.array(list(tokenized[c]) if c != "truncated" else tokenized[c]) for c in UNIT_COLUMNS}
    cols["id"], cols["source"] = cols["id"].cast(pa.string()), cols["source"].cast(pa.string())
    for c in ("input_ids", "labels"):
        cols[c] = pa.array([np.asarray(x, np.int64) for x in tokenized[c]], pa.list_(pa.int64()))
    table = pa.table(cols)
    sink = pa.BufferOutputStream()
    with pa.ipc.new_stream(sink, table.schema) as writer:
        writer.write_table(table)
    return sink.getvalue().to_pybytes()


def unpack_unit(data: bytes, shard: int) -> dict[str, Any]:
    """:func:`pack_unit`'s bytes -> the batch :class:`Scorer` takes (token lists as int64 arrays)."""
    table = pa.ipc.open_stream(pa.py_buffer(data)).read_all()
    batch: dict[str, Any] = {c: table[c].to_numpy(zero_copy_only=False) for c in UNIT_COLUMNS}
    batch["shard"] = np.full(table.num_rows, shard, dtype=np.int64)
    for c in ("input_ids", "labels"):
        col = table[c].combine_chunks()
        flat = col.flatten().to_numpy(zero_copy_only=False).astype(np.int64, copy=False)
        offsets = col.offsets.to_numpy()
        batch[c] = [flat[offsets[i] - offsets[0]:offsets[i + 1] - offsets[0]] for i in range(len(col))]
    return batch


def prepare_units(batch: dict[str, np.ndarray], *, paths: dict[int, str], unit_rows: int, model_path: str,
                  max_length: int, on_long: str, trust_remote_code: bool = False) -> dict[str, np.ndarray]:
    """Units ``(shard, start)`` -> each read (:func:`read_unit`), tokenized (:func:`tokenize_batch`)
    and packed (:func:`pack_unit`): ``shard, start, unit`` (bytes). Runs in CPU tasks."""
    packed = []
    for shard, start in zip(batch["shard"], batch["start"], strict=True):
        rows = read_unit(paths[int(shard)], int(start), unit_rows)
        cols = {c: rows[c].to_numpy(zero_copy_only=False) for c in rows.column_names}
        packed.append(pack_unit(tokenize_batch(cols, model_path, max_length, on_long, trust_remote_code)))
    return {"shard": np.asarray(batch["shard"], np.int64), "start": np.asarray(batch["start"], np.int64),
            "unit": np.array(packed, dtype=object)}


def unit_file(units: Any, shard: int, start: int) -> Any:
    """Where the scored rows of unit ``(shard, start)`` are written under ``units`` (a location)."""
    return units / f"{shard:05d}" / f"{start:09d}.parquet"


def written_units(units: Any) -> dict[int, set[int]]:
    """The units already written under ``units``: shard -> unit starts (one listing)."""
    from grads_ray import storage

    root = storage.location(units)
    if not root.exists():
        return {}
    got: dict[int, set[int]] = defaultdict(set)
    for f in storage.files_under(root):
        if f.name.endswith(".parquet") and not f.name.startswith("."):
            got[int(f.parent.name)].add(int(f.name.split(".")[0]))
    return dict(got)


LAYOUT = "layout.json"  # beside the written units: the rows of a unit they were cut in, and the batch size


def units_dir(stats: StageDir) -> Any:
    """Where a score stage's units are written until their shard is merged (one folder a shard)."""
    return stats.ledger / "units"


@dataclass(frozen=True)
class Layout:
    """How a pass cuts rows: units of ``unit_rows`` rows, scored in batches of ``batch_size``."""

    unit_rows: int
    batch_size: int


def unit_layout(stats: StageDir, shards: Any, setting: int | str, first: Callable[[], int]) -> tuple[Layout, bool]:
    """The layout of a pass over the unfinished ``shards`` -> (layout, whether units of them are
    written already in it).

    ``units/layout.json`` holds the units' size and the batch size of the last pass that began; it
    lives until the stage is done. The unit size is the written units' (whatever ``score.batch_size``
    is now, so a rerun with another batch size, as an out-of-memory error advises, neither scores a
    row twice nor skips one), else eight batches. The batch size is the setting when it is an
    integer (recorded, so a later ``auto`` rerun keeps the lowered size); under ``auto``, the
    recorded one (units from before 2026-12 without it: an eighth of the unit), else ``first()``
    (measured on a GPU), recorded: so every pass of a run cuts the same batches under ``auto``."""
    from grads_ray import storage
    from grads_ray.config import ConfigError
    from grads_ray.rundir import read_json, write_json

    root = storage.location(units_dir(stats))
    path = root / LAYOUT
    got = read_json(path) if path.exists() else None
    written = any(s in shards for s in written_units(root))
    fixed = setting if isinstance(setting, int) else None
    if written and got is None and fixed is None:
        raise ConfigError(f"{root}: units written without {LAYOUT} (before 2026-12): set score.batch_size to "
                          "the integer they were written with")
    if fixed is not None:
        batch = fixed
    elif got is not None:
        batch = int(got.get("batch_size") or int(got["unit_rows"]) // ROWS_PER_BLOCK_BATCHES)
    else:
        batch = first()
    rows = int(got["unit_rows"]) if written and got is not None else ROWS_PER_BLOCK_BATCHES * batch
    storage.makedirs(root)
    write_json(path, {"unit_rows": rows, "batch_size": batch})
    return Layout(rows, batch), written


def units_of(expected: dict[int, int], unit_rows: int) -> dict[int, list[int]]:
    """shard -> its units' starts: multiples of ``unit_rows`` whatever else is being scored, so a
    unit (and so a row's batch mates) never depends on which shards a run had left to do."""
    return {s: list(range(0, n, unit_rows)) for s, n in expected.items()}


def rows_written(stats: StageDir, expected: dict[int, int], unit_rows: int) -> int:
    """Rows of unfinished shards whose units are already written (a resumed run does not score
    them again)."""
    got = written_units(units_dir(stats))
    return sum(min(unit_rows, expected[s] - a) for s, starts in got.items() if s in expected
               and not stats.is_done(s) for a in starts if a < expected[s])


def check_examples(rows: StageDir, expected: dict[int, int], *, model_path: str, max_length: int, on_long: str,
                   trust_remote_code: bool = False, n: int = 4, head: int = 64) -> list[tuple[list[int], list[int]]]:
    """The rows every scorer's self-check scores (gradients/selfcheck.py): up to ``n`` of different
    lengths among the first ``head`` rows of the first shard that has any, tokenized as the job
    tokenizes them (in the driver, before Ray Data starts). Empty when no row tokenizes (the scorers
    then check on random tokens)."""
    from grads_ray.gradients.selfcheck import pick_rows

    shard = next((s for s in sorted(expected) if expected[s] > 0), None)
    if shard is None:
        return []
    t = read_slice(str(rows.part(shard)), 0, head)
    cols = {c: t[c].to_numpy(zero_copy_only=False) for c in t.column_names}
    got = tokenize_batch(cols, model_path, max_length, on_long, trust_remote_code)
    pairs = [(x.tolist(), y.tolist()) for x, y, r in zip(got["input_ids"], got["labels"], got["reason"], strict=True)
             if not r]
    return pick_rows(pairs, n)


def finish_shard(shard: int, stats: StageDir, features: StageDir) -> dict[str, Any]:
    """A shard whose units are all written -> its stats part (sorted by id), features part,
    tokenization rejects and marker; then its units are deleted. The same files whatever order the
    units were written in. -> the shard's ledger entry."""
    import pyarrow.parquet as pq

    from grads_ray import storage

    folder = units_dir(stats) / f"{shard:05d}"
    files = [f for f in (storage.files_under(folder) if folder.exists() else []) if f.name.endswith(".parquet")]
    tables = []
    for f in sorted(files, key=lambda f: f.name):
        with f.open("rb") as fh:
            tables.append(pq.read_table(fh))
    table = pa.concat_tables(tables, promote_options="default") if tables else _empty_scored()
    ok = pc.equal(table["reason"], "")
    good = table.filter(ok)
    good = good.take(pc.sort_indices(good["id"]))
    group_cols = sorted(c for c in good.column_names if "." in c)
    stats_table = good.select(STAT_BASE + group_cols).cast(
        pa.schema([(c, pa.string() if c == "id" else (pa.int64() if c.startswith("n_") else pa.float64()))
                   for c in STAT_BASE + group_cols]))
    stats_table = stats_table.append_column("finite", pa.array(finite_rows(stats_table), pa.bool_()))
    stats_table = stats_table.append_column("truncated", good["truncated"].cast(pa.bool_()))
    write_parquet(stats.part(shard), stats_table)
    feature_cols = ["id", *(c for c in FEATURE_COLUMNS if c in good.column_names)]
    feats = good.select(feature_cols)
    write_parquet(features.part(shard), feats.cast(pa.schema([feats.schema.field(c) for c in feature_cols])))
    bad = table.filter(pc.invert(ok)).select(["id", "source", "line", "reason", "detail"]).to_pylist()
    write_jsonl(stats.rejects(shard), [{**r, "stage": "score"} for r in bad])
    nodes = sorted(set(table["node"].to_pylist()))
    info = {"shard": shard, "scored": good.num_rows, "rejected": len(bad), "nodes": nodes,
            "truncated": int(pc.sum(stats_table["truncated"]).as_py() or 0),
            "nonfinite": int(stats_table.num_rows - (pc.sum(stats_table["finite"]).as_py() or 0))}
    stats.mark_done(shard, info)
    features.mark_done(shard, info)
    storage.rmtree(folder)
    return info


def _empty_scored() -> pa.Table:
    cols = {c: pa.array([], pa.float64()) for c in STAT_BASE if c != "id"}
    return pa.table({"id": pa.array([], pa.string()), "source": pa.array([], pa.string()),
                     "line": pa.array([], pa.int64()), "reason": pa.array([], pa.string()),
                     "detail": pa.array([], pa.string()), "truncated": pa.array([], pa.bool_()),
                     "node": pa.array([], pa.string()), **cols})
