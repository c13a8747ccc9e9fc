"""The run directory: atomic files, per-shard completion markers, stage fingerprints, the manifest.

A stage writes ``<stage>/part-{shard:05d}.parquet``, the shard's rejects
(``<stage>/.ledger/rejected/part-*.jsonl``) and then a marker ``<stage>/.ledger/done/{shard:05d}.json``
(written last, atomically: see grads_ray/storage.py for local folders and object stores), so a crash
leaves either a finished shard or nothing that counts. A stage's ``.ledger/SUCCESS.json`` holds the
fingerprint of the configuration it ran with: a rerun with the same fingerprint skips the stage, a
changed one clears it and computes it again.

A stage folder holds its table's parts and nothing else a reader sees: the ledger's name starts with
a dot, which ``pandas.read_parquet(DIR)``, ``pyarrow.dataset.dataset(DIR)``, DuckDB's
``DIR/*.parquet`` and ``datasets.load_dataset("parquet", data_dir=DIR)`` all skip (``datasets`` reads
``_`` names as data), and :func:`unify_parts` gives the parts one schema.
"""

from __future__ import annotations

import hashlib
import json
import time
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

from grads_ray import storage
from grads_ray.storage import Location


def fingerprint(*parts: Any) -> str:
    """A short stable hash of JSON-able values (configs, upstream fingerprints)."""
    text = json.dumps(parts, sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def write_json(path: Location, obj: Any) -> None:
    write_text(path, json.dumps(obj, indent=2, default=str) + "\n")


def write_text(path: Location, text: str) -> None:
    storage.write_bytes(storage.location(path), text.encode())


def write_jsonl(path: Location, rows: list[dict[str, Any]]) -> None:
    write_text(path, "".join(json.dumps(row, ensure_ascii=False, default=str) + "\n" for row in rows))


def write_parquet(path: Location, table: pa.Table, row_group_size: int | None = None) -> None:
    """``table`` as one Parquet file, atomically. An empty table is written with no row group at all
    (pyarrow would write one of 0 rows, which ``datasets`` cannot read: a batch size of 0)."""
    def write(fh) -> None:
        if table.num_rows:
            pq.write_table(table, fh, row_group_size=row_group_size)
        else:
            pq.ParquetWriter(fh, table.schema).close()

    storage.atomic_write(storage.location(path), write)


def read_json(path: Location) -> Any:
    return json.loads(storage.location(path).read_text())


LEDGER = ".ledger"  # in every stage folder: markers, fingerprint, rejects (hidden from table readers)


class StageDir:
    """One stage's folder: its table's parts, and the ledger (shard markers, rejects, fingerprint)."""

    def __init__(self, root: Location, name: str):
        self.path = storage.location(root) / name
        self.ledger = self.path / LEDGER
        self.name = name
        self._started: float | None = None  # set by prepare() when the stage is to be computed

    def part(self, shard: int, suffix: str = "parquet") -> Location:
        return self.path / f"part-{shard:05d}.{suffix}"

    def marker(self, shard: int) -> Location:
        return self.ledger / "done" / f"{shard:05d}.json"

    def is_done(self, shard: int) -> bool:
        return self.marker(shard).exists()

    def mark_done(self, shard: int, info: dict[str, Any]) -> None:
        write_json(self.marker(shard), info)

    def done_info(self, shard: int) -> dict[str, Any]:
        return read_json(self.marker(shard))

    def parts(self) -> list[Location]:
        """The table's Parquet parts, in shard order."""
        return sorted(self.path.glob("part-*.parquet"), key=str)

    def rejects(self, shard: int) -> Location:
        """A shard's rejected rows (JSON lines), in the ledger, where table readers skip them."""
        return self.ledger / "rejected" / f"part-{shard:05d}.jsonl"

    def reject_parts(self) -> list[Location]:
        """Every shard's rejects, in shard order."""
        return sorted((self.ledger / "rejected").glob("part-*.jsonl"), key=str)

    @property
    def success_path(self) -> Location:
        """Written last by :meth:`finish`: the stage is complete for the fingerprint it holds."""
        return self.ledger / "SUCCESS.json"

    # stage-level completion ------------------------------------------------------------------
    def prepare(self, fp: str) -> bool:
        """Ready the folder for a run with fingerprint ``fp``. -> True when it is already complete.

        A folder left by a run with another fingerprint is cleared; one left by an interrupted run
        with the same fingerprint keeps its finished shards.
        """
        success = self.success_path
        started = self.ledger / "FINGERPRINT"
        if success.exists() and read_json(success).get("fingerprint") == fp:
            return True
        if self.path.exists() and (not started.exists() or started.read_text() != fp):
            storage.rmtree(self.path)
        storage.makedirs(self.path)
        write_text(started, fp)
        self._started = time.time()
        return False

    def reopen(self) -> None:
        """Unmark a complete folder: the next :meth:`prepare` with its fingerprint keeps its shards
        and the stage runs again over them (to write what it writes beside its folders)."""
        if self.success_path.exists():
            storage.remove(self.success_path)

    def finish(self, fp: str, info: dict[str, Any]) -> None:
        """Mark the stage complete. ``computed_seconds`` (from :meth:`prepare`) keeps the time of the run
        that computed it, which a later run that finds the stage done (manifest ``seconds`` ~0) still shows."""
        took = {} if self._started is None else {"computed_seconds": round(time.time() - self._started, 2)}
        write_json(self.success_path, {"fingerprint": fp, **took, **info})  # a reopened stage keeps its first time

    def success_info(self) -> dict[str, Any]:
        return read_json(self.success_path)


def read_parts(paths: list[Location], columns: list[str] | None = None) -> pa.Table:
    """Concatenate Parquet parts (an empty list gives an empty table)."""
    tables = []
    for p in paths:  # a part may lack columns (an empty shard has no group columns): read what it has
        have = None if columns is None else [c for c in columns if c in pq.read_schema(str(p)).names]
        tables.append(pq.read_table(str(p), columns=have))
    if not tables:
        return pa.table({c: [] for c in (columns or [])})
    return pa.concat_tables(tables, promote_options="default")


def unify_parts(stage: StageDir) -> int:
    """Give every Parquet part of a stage folder one schema, so the folder reads as one table.

    A part can lack columns another has: a shard with no scored row has no per-group statistics, an
    empty shard no feature columns. The schema is the union of the parts' (fields in the first
    non-empty part's order, then any others; a field's metadata, such as a feature's shape, from the
    first part that has it); a part that differs is rewritten with the missing columns as nulls. ->
    how many parts were rewritten."""
    parts = stage.parts()
    metas = []
    for p in parts:  # a local file or an object (the footer only)
        with p.open("rb") as fh:
            metas.append(pq.read_metadata(fh))
    schemas = [m.schema.to_arrow_schema() for m in metas]
    if len({s.remove_metadata().to_string(show_field_metadata=True) for s in schemas}) <= 1:
        return 0
    order = sorted(range(len(parts)), key=lambda i: metas[i].num_rows == 0)  # parts with rows first
    target = pa.unify_schemas([schemas[i].remove_metadata() for i in order], promote_options="permissive")
    rewritten = 0
    for p, schema in zip(parts, schemas, strict=True):
        if schema.remove_metadata().equals(target, check_metadata=True):
            continue
        with p.open("rb") as fh:  # a local file or an object, as the footers above
            table = pq.read_table(fh)
        cols = [table[f.name].cast(f.type) if f.name in table.column_names else pa.nulls(table.num_rows, f.type)
                for f in target]
        write_parquet(p, pa.Table.from_arrays(cols, schema=target))
        rewritten += 1
    return rewritten


class ShardCache:
    """Finished shards' files by key (a hash of the shard's rows and of everything that decides its
    numbers): ``ROOT/<key>/<name>`` and ``info.json``, written last. A later run, on another corpus
    version or into another output folder, takes a shard whose key it finds instead of computing it.
    Safe to delete at any time."""

    def __init__(self, root: Location):
        self.root = storage.location(root)

    def get(self, key: str) -> dict[str, Any] | None:
        path = self.root / key / "info.json"
        return read_json(path) if path.exists() else None

    def put(self, key: str, files: dict[str, Location], info: dict[str, Any]) -> None:
        for name, src in files.items():
            storage.link_or_copy(src, self.root / key / name)
        write_json(self.root / key / "info.json", info)

    def restore(self, key: str, files: dict[str, Location]) -> None:
        for name, dst in files.items():
            storage.link_or_copy(self.root / key / name, dst)
