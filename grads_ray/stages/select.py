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
from grads_ray.rundir import StageDir, fingerprint, read_parts, write_parquet
from grads_ray.selection.inputs import BASE_COLUMNS, SelectionInputs, method_needs
from grads_ray.stages.base import Done, Outputs, Stage, no_rows

SIMILARITY_COLUMNS = ["id", "nn_rows", "nn_sims", "dup_group", "diversity", "cluster"]


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

    def fingerprint(self, ctx) -> str:
        need = method_needs(ctx.cfg.select)
        ups = [ctx.need("score").fingerprint]  # in this order: run directories keep their fingerprints
        if need.neighbours:
            ups.append(ctx.need("similarity").fingerprint)
        if need.target:
            ups.append(ctx.need("target").fingerprint)
        if _vectors_from_embed(ctx.cfg):
            ups.append(ctx.need("embed").fingerprint)
        # "subset-parts": the stage's folder holds the shuffled subset (older run folders did not)
        settings = {k: v for k, v in asdict(ctx.cfg.select).items() if k != "memory_mb"}  # changes no pick
        return fingerprint("select", *ups, settings, ctx.cfg.seed, "subset-parts")

    def run(self, ctx, out: Outputs) -> dict[str, Any]:
        from grads_ray.selection.budget import parse_budget
        from grads_ray.selection.select import select

        cfg, sc = ctx.cfg, ctx.cfg.select
        t0 = time.time()
        device = "cuda" if sc.method == "fisher" and ctx.resources.torch_gpu(sc.fisher.use_gpu) else "cpu"
        spill = _spill_folder(out["select"])
        try:
            inputs = read_inputs(ctx, spill)
            res = select(inputs, parse_budget(sc.budget), sc, cfg.seed, device=device)
        except InputError:
            raise
        except ValueError as exc:  # a setting that does not fit this corpus: say which
            raise InputError(f"select: {exc}") from None
        finally:
            shutil.rmtree(spill, ignore_errors=True)
        select_s = time.time() - t0
        cols, ids = inputs.columns, inputs.ids
        table = pa.table({"id": ids, **{k: pa.array(v) for k, v in res.items()}})
        write_parquet(ctx.out / "selection.parquet", table)
        stages = {**ctx.manifest.get("stages", {}), "select": {"method": sc.method, "budget": sc.budget}}
        write_report(ctx.out, cols, ids, res["selected"], res["reason"], (inputs.similarity or {}).get("dup_group"),
                     {**ctx.manifest, "stages": stages})
        chosen = table.filter(table["selected"])
        chosen = chosen.take(pc.sort_indices(chosen["rank"]))
        write_selected(ctx.out, out["select"], ctx.need("ingest").value.rows, chosen["id"], seed=cfg.seed,
                       part_rows=cfg.data.shard_rows)
        return {"method": sc.method, "budget": sc.budget, "scored": len(res["selected"]),
                "selected": int(res["selected"].sum()), "selected_tokens": int(cols["n_tokens"][res["selected"]].sum()),
                "total_tokens": int(cols["n_tokens"].sum()), "select_seconds": round(select_s, 2),
                "memory_mapped": sorted(k for k in ("fisher_factors", "grad_proj")
                                        if isinstance(getattr(inputs, k), np.memmap)),
                "not_selected_by_reason": dict(Counter(r for r in res["reason"] if r)),
                "selected_by_source": count_by(inputs.source, res["selected"])}

    def value(self, ctx, out: Outputs, info: dict[str, Any]):
        return ctx.out / "selection.parquet"

    def check(self, ctx, done: Done) -> None:
        if done.info["selected"] == 0:
            why = ", ".join(f"{k} {v}" for k, v in done.info.get("not_selected_by_reason", {}).items())
            no_rows(ctx, f"select: no row selected of {done.info['scored']} (budget {done.info['budget']}"
                    + (f"; not selected: {why}" if why else "") + ")")


def read_inputs(ctx, spill) -> SelectionInputs:
    """Everything the configured method reads, each table sorted by id (the similarity stage's
    neighbour positions are in that order too). Feature matrices over ``select.memory_mb`` are
    memory-mapped files under ``spill`` (a local folder)."""
    cfg = ctx.cfg
    need = method_needs(cfg.select)
    score = ctx.need("score")
    stats = read_parts(score["stats"].parts(), stats_columns(score["stats"], need.columns))
    if stats.num_rows == 0:
        raise InputError(f"no row of the corpus could be scored: see {ctx.out / 'rejected.jsonl'}")
    stats = stats.take(pc.sort_indices(stats["id"]))
    ids = stats["id"].combine_chunks()
    inputs = SelectionInputs({c: stats[c].to_numpy() for c in stats.column_names if c != "id"}, ids,
                             source=_sources(ctx.need("ingest").value.rows, ids))
    if need.neighbours:
        sim = aligned(ctx.need("similarity")["similarity"], ids, SIMILARITY_COLUMNS)
        inputs.similarity = {"dup_group": sim["dup_group"].to_numpy(), "diversity": sim["diversity"].to_numpy(),
                             "cluster": sim["cluster"].to_numpy(), "nn_idx": matrix(sim["nn_rows"], np.int64),
                             "nn_sims": matrix(sim["nn_sims"])}
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


def aligned_features(stage: StageDir, ids: pa.Array, column: str, spill, limit_bytes: int,
                     legacy=None) -> np.ndarray:
    """(N, *shape) float32: a feature column of ``stage`` in the order of ``ids`` (the scored ids,
    sorted), read part by part, so the driver holds one part's rows at a time besides the result.
    The result is in memory when it takes at most ``limit_bytes``, else an ``np.memmap`` in the
    folder ``spill``. The per-row shape is the field's metadata; ``legacy(width)`` gives it for
    columns written before it was recorded (None: refused). Checks that the parts hold exactly
    the ids."""

    parts = stage.parts()
    id_parts = [pq.read_table(str(p), columns=["id"])["id"] for p in parts]
    sizes = [len(c) for c in id_parts]
    every = pa.chunked_array([c for part in id_parts for c in part.chunks], pa.string())
    order = pc.sort_indices(every).to_numpy()  # every[order[k]] is the k-th smallest id: position k
    if len(every) != len(ids) or not every.take(pa.array(order)).combine_chunks().equals(ids):
        raise RuntimeError(f"{stage.path.name} and the stats table hold different ids: rerun with a fresh output")
    position = np.empty(len(order), np.int64)
    position[order] = np.arange(len(order))
    out, offset = None, 0
    for p, m in zip(parts, sizes, strict=True):
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
            out[position[offset:offset + m]] = rows
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


def aligned(stage: StageDir, ids: pa.Array, columns: list[str]) -> pa.Table:
    """A stage's table sorted by id, checked to hold exactly the scored ids."""
    t = read_parts(stage.parts(), columns)
    t = t.take(pc.sort_indices(t["id"]))
    if t.num_rows != len(ids) or not t["id"].combine_chunks().equals(ids):
        raise RuntimeError(f"{stage.path.name} and the stats table hold different ids: rerun with a fresh output")
    return t


def _sources(rows: StageDir, ids: pa.Array) -> pa.Array:
    """Each scored id's source (its input file, relative to the path given), as Arrow strings."""
    t = read_parts(rows.parts(), ["id", "source"])
    return t["source"].combine_chunks().take(pc.index_in(ids, value_set=t["id"].combine_chunks()))


def count_by(names: pa.Array, mask: np.ndarray) -> dict[str, int]:
    """How many rows under ``mask`` carry each name."""
    from grads_ray.selection.select import source_codes

    code, labels = source_codes(names)
    counts = np.bincount(code[mask], minlength=len(labels))
    return {label: int(c) for label, c in zip(labels, counts, strict=True) if c}


def write_selected(out, subset: StageDir, rows: StageDir, ranked_ids: pa.Array, *, seed: int,
                   part_rows: int) -> None:
    """The original rows of the selected ids (``ranked_ids``: in rank order):

    - ``selected.jsonl`` (one JSON record a line, as read) and ``selected.parquet`` (id, rank,
      record), in rank order, for the user;
    - ``subset`` (the select stage's folder): the same rows in a seeded random order, in parts of
      ``part_rows``: what the fine-tune reads, so its data path costs O(selected rows) per epoch.

    Records stay Arrow strings (no Python object per row), read part by part from the rows table."""
    ranked_ids = ranked_ids.cast(pa.string())
    pieces = []
    for part in rows.parts():
        t = pq.read_table(str(part), columns=["id", "record"])
        rank = pc.index_in(t["id"], value_set=ranked_ids)
        keep = pc.is_valid(rank)
        pieces.append(t.filter(keep).append_column("rank", rank.filter(keep).cast(pa.int64())))
    table = pa.concat_tables(pieces) if pieces else pa.table({"id": pa.array([], pa.string()),
                                                              "record": pa.array([], pa.string()),
                                                              "rank": pa.array([], pa.int64())})
    if table.num_rows != len(ranked_ids):
        have = set(table["id"].to_pylist())
        missing = next(i for i in ranked_ids.to_pylist() if i not in have)
        raise RuntimeError(f"{len(ranked_ids) - table.num_rows} selected ids have no ingested row (first: {missing!r})")
    order = pc.sort_indices(table["rank"])
    table = table.select(["id", "rank", "record"]).take(order)  # the unsorted copy is dropped here
    del pieces, order

    def jsonl(fh) -> None:
        for batch in table.to_batches(max_chunksize=10_000):
            fh.write("".join(r + "\n" for r in batch["record"].to_pylist()).encode())

    storage.atomic_write(storage.location(out / "selected.jsonl"), jsonl)
    write_parquet(out / "selected.parquet", table)
    perm = np.random.default_rng([seed, 0x5E1EC7]).permutation(table.num_rows)
    for k, start in enumerate(range(0, table.num_rows, part_rows)):  # one part's copy at a time
        write_parquet(subset.part(k), table.take(pa.array(perm[start:start + part_rows])))


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
