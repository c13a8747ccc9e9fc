"""The run directory: atomic files, per-shard completion markers, stage fingerprints, the manifest.

A stage writes ``<stage>/part-{shard:05d}.*`` and then a marker ``<stage>/_done/{shard:05d}.json``
(written last, atomically), so a crash leaves either a finished shard or nothing that counts. A stage's
``_SUCCESS.json`` holds the fingerprint of the configuration it ran with: a rerun with the same
fingerprint skips the stage, a changed one clears it and computes it again.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq


def fingerprint(*parts: Any) -> str:
    """A short stable hash of JSON-able values (configs, upstream fingerprints)."""
    text = json.dumps(parts, sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def _atomic(path: Path, write) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    os.close(fd)
    try:
        write(tmp)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def write_json(path: Path, obj: Any) -> None:
    _atomic(Path(path), lambda tmp: Path(tmp).write_text(json.dumps(obj, indent=2, default=str) + "\n"))


def write_jsonl(path: Path, rows: list[dict[str, Any]]) -> None:
    def write(tmp: str) -> None:
        with open(tmp, "w") as fh:
            for row in rows:
                fh.write(json.dumps(row, ensure_ascii=False, default=str) + "\n")

    _atomic(Path(path), write)


def write_parquet(path: Path, table: pa.Table) -> None:
    _atomic(Path(path), lambda tmp: pq.write_table(table, tmp))


def read_json(path: Path) -> Any:
    return json.loads(Path(path).read_text())


class StageDir:
    """One stage's folder with its shard ledger and fingerprint."""

    def __init__(self, root: Path, name: str):
        self.path = Path(root) / name
        self.name = name

    def part(self, shard: int, suffix: str = "parquet") -> Path:
        return self.path / f"part-{shard:05d}.{suffix}"

    def marker(self, shard: int) -> Path:
        return self.path / "_done" / f"{shard:05d}.json"

    def is_done(self, shard: int) -> bool:
        return self.marker(shard).exists()

    def mark_done(self, shard: int, info: dict[str, Any]) -> None:
        write_json(self.marker(shard), info)

    def done_info(self, shard: int) -> dict[str, Any]:
        return read_json(self.marker(shard))

    def parts(self, suffix: str = "parquet") -> list[Path]:
        return sorted(self.path.glob(f"part-*.{suffix}"))

    # stage-level completion ------------------------------------------------------------------
    def prepare(self, fp: str) -> bool:
        """Ready the folder for a run with fingerprint ``fp``. -> True when it is already complete.

        A folder left by a run with another fingerprint is cleared; one left by an interrupted run
        with the same fingerprint keeps its finished shards.
        """
        success = self.path / "_SUCCESS.json"
        started = self.path / "_FINGERPRINT"
        if success.exists() and read_json(success).get("fingerprint") == fp:
            return True
        if self.path.exists() and (not started.exists() or started.read_text() != fp):
            shutil.rmtree(self.path)
        self.path.mkdir(parents=True, exist_ok=True)
        started.write_text(fp)
        return False

    def finish(self, fp: str, info: dict[str, Any]) -> None:
        write_json(self.path / "_SUCCESS.json", {"fingerprint": fp, **info})

    def success_info(self) -> dict[str, Any]:
        return read_json(self.path / "_SUCCESS.json")


def read_parts(paths: list[Path], columns: list[str] | None = None) -> pa.Table:
    """Concatenate Parquet parts (an empty list gives an empty table)."""
    tables = []
    for p in paths:  # a part may lack columns (an empty shard has no group columns): read what it has
        have = None if columns is None else [c for c in columns if c in pq.read_schema(p).names]
        tables.append(pq.read_table(p, columns=have))
    if not tables:
        return pa.table({c: [] for c in (columns or [])})
    return pa.concat_tables(tables, promote_options="default")


def link_or_copy(src: str | Path, dst: str | Path) -> None:
    """``dst`` becomes ``src``'s content: a hard link when the file system allows (no copy; every
    writer here replaces files, never edits them, so a shared inode stays right), else a copy."""
    src, dst = Path(src), Path(dst)
    dst.parent.mkdir(parents=True, exist_ok=True)
    tmp = dst.with_name(f".{dst.name}.link")
    tmp.unlink(missing_ok=True)
    try:
        os.link(src, tmp)
    except OSError:
        shutil.copy2(src, tmp)
    os.replace(tmp, dst)


class ShardCache:
    """Finished shards' files by key (a hash of the shard's rows and of everything that decides its
    numbers): ``ROOT/<key>/<name>`` and ``info.json``, written last. A later run, on another corpus
    version or into another output folder, takes a shard whose key it finds instead of computing it.
    Safe to delete at any time."""

    def __init__(self, root: Path):
        self.root = Path(root)

    def get(self, key: str) -> dict[str, Any] | None:
        path = self.root / key / "info.json"
        return read_json(path) if path.exists() else None

    def put(self, key: str, files: dict[str, Path], info: dict[str, Any]) -> None:
        for name, src in files.items():
            link_or_copy(src, self.root / key / name)
        write_json(self.root / key / "info.json", info)

    def restore(self, key: str, files: dict[str, Path]) -> None:
        for name, dst in files.items():
            link_or_copy(self.root / key / name, dst)
