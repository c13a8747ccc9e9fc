"""select: the subset, under the budget, by the configured method.

1. read what the method declares (grads_ray/selection/inputs.py): the stats columns, and where asked
   the similarity stage's neighbours, FisherSFT's factors, LESS's projected gradients and target,
   the similarity feature's vectors — every table sorted by id and checked to hold the scored ids;
2. choose (grads_ray/selection/select.py: arrays in, arrays out);
3. write ``selection.parquet`` (every scored id, its verdict and each score component),
   ``selection_report.md``, the selected rows in rank order as ``selected.jsonl`` (the original
   records) and ``selected.parquet`` (id, rank, record), and the same rows shuffled (seeded) as
   ``select/part-*.parquet``, which the fine-tune reads.
Later stages receive the path of ``selection.parquet``.
"""

from __future__ import annotations

import json
import shutil
import tempfile
import time
from collections import Counter
from dataclasses import asdict
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from grads_ray import storage
from grads_ray.columns import SHAPE_KEY, matrix
from grads_ray.data.readers import InputError
from grads_ray.evaluation.report import PLOTTED, write_report
from grads_ray.rundir import StageDir, read_parts, write_parquet
from grads_ray.selection.inputs import BASE_COLUMNS, Neighbours, PartColumns, SelectionInputs, method_needs
from grads_ray.selection.ranking import id_hash
from grads_ray.selection.spill import ColumnSpill
from grads_ray.stages.base import Done, Outputs, Stage, no_rows


def _vectors_from_embed(cfg) -> bool:
    """Whether the ``max_similarity`` pass reads the sentence encoder's vectors (the embed stage)."""
    return method_needs(cfg.select).vectors and cfg.similarity.feature == "encoder"


class Select(Stage):
    name, folders = "select", ("select",)
    about = "the subset under the budget: selection.parquet, selected.jsonl"

    def needs(self, cfg) -> list[str]:
        need = method_needs(cfg.select)
        return ["ingest", "score", *(["target"] if need.target else []),
                *(["embed"] if _vectors_from_embed(cfg) else []), *(["similarity"] if need.neighbours else [])]

    def settings(self, cfg) -> tuple:
        return {k: v for k, v in asdict(cfg.select).items() if k != "memory_mb"}, cfg.seed  # memory picks nothing

    def run(self, ctx, out: Outputs) -> dict[str, Any]:
        from grads_ray.selection.budget import parse_budget
        from grads_ray.selection.select import select

        cfg, sc = ctx.cfg, ctx.cfg.select
        t0 = time.time()
        device = "cuda" if sc.method == "fisher" and ctx.resources.torch_gpu(sc.fisher.use_gpu) else "cpu"
        spill = _spill_folder(out["select"])
        try:
            try:
                inputs = read_inputs(ctx, spill)
                res = select(inputs, parse_budget(sc.budget), sc, cfg.seed, device=device,
                             out=ColumnSpill(spill / "result"))
            except InputError:
                raise
            except ValueError as exc:  # a setting that does not fit this corpus: say which
                raise InputError(f"select: {exc}") from None
            select_s = time.time() - t0
            cols, ids = inputs.columns, inputs.ids
            write_selection(ctx.out / "selection.parquet", ids, res)
            stages = {**ctx.manifest.get("stages", {}), "select": {"method": sc.method, "budget": sc.budget}}
            selected, reason = res["selected"], res["reason"]
            write_report(ctx.out, cols, ids, selected, reason, (inputs.similarity or {}).get("dup_group"),
                         {**ctx.manifest, "stages": stages})
            info = {"method": sc.method, "budget": sc.budget, "scored": len(selected), "selected": int(selected.sum()),
                    "selected_tokens": int(cols["n_tokens"][selected].sum()),
                    "total_tokens": int(cols["n_tokens"].sum()), "select_seconds": round(select_s, 2),
                    "memory_mapped": sorted(k for k in ("fisher_factors", "grad_proj")
                                            if isinstance(getattr(inputs, k), np.memmap)),
                    "not_selected_by_reason": dict(Counter(r for r in reason if r)),
                    "selected_by_source": count_by(inputs.source, selected)}
            chosen = np.flatnonzero(selected)
            ranked = ids.take(pa.array(chosen[np.argsort(res["rank"][chosen], kind="stable")]))
            del inputs, res, cols, ids, selected, reason, chosen  # the records come next: the per-row arrays go first
            write_selected(ctx.out, out["select"], ctx.need("ingest").value.rows, ranked, seed=cfg.seed,
                           part_rows=cfg.data.shard_rows, spill=spill)
        finally:
            shutil.rmtree(spill, ignore_errors=True)
        return info

    def value(self, ctx, out: Outputs, info: dict[str, Any]):
        return ctx.out / "selection.parquet"

    def check(self, ctx, done: Done) -> None:
        if done.info["selected"] == 0:
            why = ", ".join(f"{k} {v}" for k, v in done.info.get("not_selected_by_reason", {}).items())
            no_rows(ctx, f"select: no row selected of {done.info['scored']} (budget {done.info['budget']}"
                    + (f"; not selected: {why}" if why else "") + ")")


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


def read_inputs(ctx, spill) -> SelectionInputs:
    """Everything the configured method reads, in the order of the sorted scored ids (the similarity
    stage's neighbour positions are in that order too), each part checked to hold the scored ids.

    Nothing per row is held that the selection does not use at that moment: the stats columns are
    read one whole column at a time when asked for (:class:`PartColumns`), the k-NN lists part by
    part in each pass over them (:class:`Neighbours`), the sources as dictionary codes; feature
    matrices over ``select.memory_mb`` are memory-mapped files under ``spill`` (a local folder)."""
    cfg = ctx.cfg
    need = method_needs(cfg.select)
    score = ctx.need("score")
    order = IdOrder(score["stats"])
    ids = order.ids
    if len(ids) == 0:
        raise InputError(f"no row of the corpus could be scored: see {ctx.out / 'rejected.jsonl'}")
    names = [c for c in stats_columns(score["stats"], need.columns) if c != "id"]
    inputs = SelectionInputs(PartColumns(names, order.column, cached=BASE_COLUMNS), ids,
                             source=_sources(ctx.need("ingest").value.rows, order))
    if need.neighbours:
        inputs.similarity = similarity_inputs(ctx.need("similarity")["similarity"], ids)
    limit = int(cfg.select.memory_mb * 2**20)
    if need.factors:
        r = cfg.score.fisher_rank
        inputs.fisher_factors = aligned_features(score["features"], ids, "fisher_factor", spill, limit,
                                                 legacy=lambda w: (r, w // r) if w % r == 0 and w // r >= r else None)
    if need.grad_proj:
        inputs.grad_proj = aligned_features(score["features"], ids, "grad_proj", spill, limit, legacy=_row)
    if need.target:
        inputs.target_proj = matrix(read_parts(ctx.need("target")["target"].parts())["grad_proj"])
    if need.vectors:
        from grads_ray.similarity.index import unit_vectors

        s = cfg.similarity
        src = ctx.need("embed")["embeddings"] if s.feature == "encoder" else score["features"]
        inputs.vectors = unit_vectors(aligned_features(src, ids, s.feature, spill, limit, legacy=_row),
                                      center=s.centred())
    return inputs


class IdOrder:
    """A stage table's parts and where each of their rows goes in id order: ``ids`` (N,) sorted
    Arrow strings, ``position`` (N,) int64 (row r of the parts read in turn is the position[r]-th
    smallest id). Built from the id column alone, part by part; 8 bytes a row besides the ids."""

    def __init__(self, stage: StageDir, expect: pa.Array | None = None):
        self.stage, self.parts = stage, stage.parts()
        id_parts = [pq.read_table(str(p), columns=["id"])["id"].combine_chunks() for p in self.parts]
        self.sizes = [len(c) for c in id_parts]
        every = pa.concat_arrays(id_parts) if id_parts else pa.array([], pa.string())  # one array: Arrow's sort
        del id_parts  # and take of a chunked array would make more copies of every id
        order = pc.sort_indices(every)
        self.ids = every.take(order)
        del every
        if expect is not None and not self.ids.equals(expect):
            raise RuntimeError(f"{stage.path.name} and the stats table hold different ids: rerun with a fresh output")
        self.position = np.empty(len(order), np.int64)
        self.position[order.to_numpy()] = np.arange(len(order))

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


def _sources(rows: StageDir, order: IdOrder) -> pa.DictionaryArray:
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


def count_by(names: pa.Array, mask: np.ndarray) -> dict[str, int]:
    """How many rows under ``mask`` carry each name."""
    from grads_ray.selection.select import source_codes

    code, labels = source_codes(names)
    counts = np.bincount(code[mask], minlength=len(labels))
    return {label: int(c) for label, c in zip(labels, counts, strict=True) if c}


SELECTION_ROW_GROUP = 1 << 16  # selection.parquet's row groups: the writer encodes one at a time
MAX_BUCKETS = 64  # write_selected: at most this many spill files per order, open at once


def write_selected(out, subset: StageDir, rows: StageDir, ranked_ids: pa.Array, *, seed: int,
                   part_rows: int, spill: Path | None = None, bucket_rows: int | None = None) -> None:
    """The original rows of the selected ids (``ranked_ids``: in rank order):

    - ``selected.jsonl`` (one JSON record a line, as read) and ``selected.parquet`` (id, rank,
      record), in rank order, for the user;
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

        storage.atomic_write(storage.location(out / "selected.jsonl"), jsonl)
        storage.atomic_write(storage.location(out / "selected.parquet"), parquet)
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


def _row(width: int) -> tuple[int]:
    """A vector column's per-row shape when its field does not say (written before shapes were)."""
    return (width,)


def _spill_folder(stage: StageDir) -> Path:
    """Where feature matrices too big for memory are memory-mapped: the stage's ledger when the
    run folder is local, else a local temporary folder."""
    if storage.is_remote(stage.path):
        return Path(tempfile.mkdtemp(prefix="grads-ray-spill-"))
    return Path(stage.ledger) / "spill"


def selected_rows(subset: StageDir) -> list[str]:
    """The fine-tune's input: the select stage's parts (the selected rows, shuffled once, seeded)."""
    return [str(p) for p in subset.parts()]
