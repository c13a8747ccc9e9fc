"""Corpus files -> shards -> raw rows with their place (file, line) or the reason they are bad.

A *shard* is the unit of work and of resumption: a byte range of a JSONL file (cut at line ends), a run
of row groups of a Parquet file, or a row range of a saved ``datasets`` dataset. Planning a shard list
is cheap and deterministic for the same files, so a rerun finds the same shards and skips finished ones.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from grads_ray.data.formats import RowError, normalize, row_id

JSONL_SUFFIXES = (".jsonl", ".json", ".ndjson")
PARQUET_SUFFIXES = (".parquet",)


class InputError(ValueError):
    """A corpus path that cannot be read at all (missing, unknown kind)."""


@dataclass(frozen=True)
class Shard:
    index: int
    path: str  # the file (or dataset folder) read
    fmt: str  # jsonl | parquet | hf
    start: int  # byte offset (jsonl) or first row (parquet, hf)
    stop: int  # end byte offset (jsonl) or end row (exclusive)
    first_line: int  # 1-based line/row number of the first row in the shard
    source: str  # the name used in ids and reject records (path relative to the input given)
    split: str = ""  # DatasetDict split for hf

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class RawRow:
    """One input row and where it came from; ``record`` is None when it could not be decoded."""

    source: str
    line: int
    record: Any = None
    error: RowError | None = None


def _is_hf_dataset(path: Path) -> bool:
    return path.is_dir() and (
        (path / "dataset_info.json").exists() or (path / "dataset_dict.json").exists()
        or (path / "state.json").exists()
    )


def _expand(path: Path) -> list[tuple[Path, str, str]]:
    """A user path -> [(file or dataset folder, fmt, source name)] in a stable order."""
    if not path.exists():
        raise InputError(f"{path}: no such file or folder")
    if _is_hf_dataset(path):
        return [(path, "hf", path.name)]
    if path.is_file():
        return [(path, _file_format(path), path.name)]
    found = []
    for root, dirs, files in os.walk(path):
        dirs.sort()
        rootp = Path(root)
        for d in list(dirs):
            if _is_hf_dataset(rootp / d):
                found.append((rootp / d, "hf", str((rootp / d).relative_to(path))))
                dirs.remove(d)
        for name in sorted(files):
            p = rootp / name
            if p.suffix.lower() in JSONL_SUFFIXES + PARQUET_SUFFIXES:
                found.append((p, _file_format(p), str(p.relative_to(path))))
    if not found:
        raise InputError(f"{path}: folder holds no .jsonl, .json or .parquet file and no saved dataset")
    return found


def _file_format(path: Path) -> str:
    suffix = path.suffix.lower()
    if suffix in JSONL_SUFFIXES:
        return "jsonl"
    if suffix in PARQUET_SUFFIXES:
        return "parquet"
    raise InputError(f"{path}: unknown file kind {suffix!r} (expected .jsonl, .json, .parquet)")


def _jsonl_cuts(path: Path, shard_bytes: int, max_lines: int | None,
                shard_rows: int | None = None) -> list[tuple[int, int, int, int]]:
    """Byte ranges ending at line ends, each cut once it holds ``shard_bytes`` bytes or ``shard_rows``
    lines, whichever comes first -> [(start, stop, first_line, n_lines)]. Rows bound a shard as
    well as bytes: a file of short rows still gives shards of bounded work (scoring, resume, the
    driver's buffer of a shard's scored rows).

    With ``max_lines`` only the first that many lines are covered (``--limit`` smoke tests).
    """
    cuts, start, pos, line, first = [], 0, 0, 1, 1
    with open(path, "rb") as fh:
        for raw in fh:
            if max_lines is not None and line > max_lines:
                break
            pos += len(raw)
            line += 1
            if pos - start >= shard_bytes or (shard_rows and line - first >= shard_rows):
                cuts.append((start, pos, first, line - first))
                start, first = pos, line
    if pos > start:
        cuts.append((start, pos, first, line - first))
    return cuts


def empty_inputs(paths: list[str], shards: list[Shard]) -> list[str]:
    """The input files that hold no row (no shard covers them): reported, not an error."""
    covered = {s.path for s in shards}
    return [source for p in paths for path, _, source in _expand(Path(p)) if str(path) not in covered]


def plan_shards(paths: list[str], shard_bytes: int, shard_rows: int, limit: int | None = None) -> list[Shard]:
    """Every input path -> the ordered list of shards that covers every row exactly once.

    ``limit`` keeps only the first ``limit`` lines/rows of the corpus, in this order.
    """
    if not paths:
        raise InputError("no input given (data.paths is empty)")
    shards: list[Shard] = []
    left = limit
    for user_path in paths:
        for path, fmt, source in _expand(Path(user_path)):
            for start, stop, first, split, n_lines in _ranges(path, fmt, shard_bytes, shard_rows, left):
                shards.append(Shard(len(shards), str(path), fmt, start, stop, first, source, split))
                if left is not None:
                    left -= n_lines
            if left is not None and left <= 0:
                return shards
    return shards


def _ranges(path: Path, fmt: str, shard_bytes: int, shard_rows: int, left: int | None
            ) -> list[tuple[int, int, int, str, int]]:
    """-> [(start, stop, first_line, split, lines or rows covered)]."""
    if fmt == "jsonl":
        return [(a, b, line, "", n) for a, b, line, n in _jsonl_cuts(path, shard_bytes, left, shard_rows)]
    if fmt == "parquet":
        import pyarrow.parquet as pq

        try:
            sizes = [("", pq.ParquetFile(path).metadata.num_rows)]
        except Exception as exc:  # noqa: BLE001 - any unreadable file is the user's input error
            raise InputError(f"{path}: not a readable Parquet file ({exc})") from None
    else:
        sizes = _hf_splits(path)
    out = []
    for split, n in sizes:
        if left is not None:
            n = min(n, max(left - sum(r[4] for r in out), 0))
        out += [(a, min(a + shard_rows, n), a + 1, split, min(a + shard_rows, n) - a)
                for a in range(0, n, shard_rows)]
    return out


def _hf_splits(path: Path) -> list[tuple[str, int]]:
    import datasets

    ds = datasets.load_from_disk(str(path))
    if isinstance(ds, datasets.DatasetDict):
        return [(name, len(ds[name])) for name in sorted(ds)]
    return [("", len(ds))]


def _decode_jsonl(shard: Shard) -> Iterator[RawRow]:
    with open(shard.path, "rb") as fh:
        fh.seek(shard.start)
        data = fh.read(shard.stop - shard.start)
    line_no = shard.first_line
    for raw in data.split(b"\n"):
        if raw.strip():
            yield _decode_line(raw, shard.source, line_no)
        line_no += 1


def _decode_line(raw: bytes, source: str, line_no: int) -> RawRow:
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        return RawRow(source, line_no, error=RowError("bad_utf8", str(exc)))
    try:
        return RawRow(source, line_no, record=json.loads(text))
    except json.JSONDecodeError as exc:
        return RawRow(source, line_no, error=RowError("bad_json", str(exc)))


def _table_rows(shard: Shard) -> Iterator[RawRow]:
    if shard.fmt == "parquet":
        import pyarrow.parquet as pq

        table = pq.ParquetFile(shard.path).read().slice(shard.start, shard.stop - shard.start)
        rows = table.to_pylist()
        source = shard.source
    else:
        import datasets

        ds = datasets.load_from_disk(shard.path)
        if shard.split:
            ds = ds[shard.split]
        rows = ds.select(range(shard.start, shard.stop)).to_list()
        source = f"{shard.source}/{shard.split}" if shard.split else shard.source
    for i, row in enumerate(rows):
        yield RawRow(source, shard.first_line + i, record=row)


def read_shard(shard: Shard) -> Iterator[RawRow]:
    """The shard's rows in file order; undecodable ones carry ``error`` instead of ``record``."""
    yield from _decode_jsonl(shard) if shard.fmt == "jsonl" else _table_rows(shard)


def validate_rows(rows: Iterator[RawRow]) -> Iterator[dict[str, Any]]:
    """Raw rows -> records for the rows table or rejects: dicts with ``id, source, line`` and either
    ``record`` (the original row as JSON text) or ``reason`` and ``detail``."""
    for raw in rows:
        place = {"source": raw.source, "line": raw.line}
        fallback = f"{raw.source}:{raw.line}"
        if raw.error is not None:
            yield {"id": fallback, **place, "reason": raw.error.reason, "detail": raw.error.detail}
            continue
        rid = fallback
        try:
            rid = row_id(raw.record, fallback)  # a reject keeps the row's own id when it has one
            normalize(raw.record)
        except RowError as err:
            yield {"id": rid, **place, "reason": err.reason, "detail": err.detail}
            continue
        yield {"id": rid, **place, "record": json.dumps(raw.record, ensure_ascii=False)}


def file_digest(path: str | Path, chunk: int = 1 << 22) -> str:
    """sha256 of a file, or of every file below a folder (sorted), for the manifest."""
    h = hashlib.sha256()
    p = Path(path)
    files = sorted(q for q in p.rglob("*") if q.is_file()) if p.is_dir() else [p]
    for f in files:
        h.update(str(f.relative_to(p) if p.is_dir() else f.name).encode())
        with open(f, "rb") as fh:
            while block := fh.read(chunk):
                h.update(block)
    return h.hexdigest()
