"""select: the subset, under the budget, by the configured method.

1. read what the method declares (grads_ray/selection/inputs.py): the stats columns, and where asked
   the similarity stage's neighbours, FisherSFT's factors, LESS's projected gradients and target,
   the similarity feature's vectors — every table sorted by id and checked to hold the scored ids
   (grads_ray/selection/reading.py);
2. choose (grads_ray/selection/choose.py: arrays in, arrays out);
3. write ``selection.parquet`` (every scored id, its verdict and each score component),
   ``selection_report.md``, the selected rows in rank order as ``selected.jsonl`` (the original
   records) and ``selected.parquet`` (id, rank, record), and the same rows shuffled (seeded) as
   ``select/part-*.parquet``, which the fine-tune reads (grads_ray/selection/writing.py).
Later stages receive the path of ``selection.parquet``.
"""

from __future__ import annotations

import shutil
import tempfile
import time
from collections import Counter
from dataclasses import asdict
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa

from grads_ray import storage
from grads_ray.columns import matrix
from grads_ray.data.readers import InputError
from grads_ray.evaluation.report import write_report
from grads_ray.rundir import StageDir, read_parts
from grads_ray.selection.inputs import BASE_COLUMNS, PartColumns, SelectionInputs, method_needs
from grads_ray.selection.reading import (
    IdOrder,
    aligned_features,
    aligned_sources,
    similarity_inputs,
    stats_columns,
)
from grads_ray.selection.spill import ColumnSpill
from grads_ray.selection.writing import write_selected, write_selection
from grads_ray.stages.base import Done, Outputs, Stage, no_rows


def _vectors_from_embed(cfg) -> bool:
    """Whether the ``max_similarity`` pass reads the sentence encoder's vectors (the embed stage)."""
    return method_needs(cfg.select).vectors and cfg.similarity.feature == "encoder"


class Select(Stage):
    name, folders = "select", ("select",)
    about = "the subset under the budget: selection.parquet, selected.jsonl"
    files = ("selection.parquet", "selection_report.md", "selected.jsonl", "selected.parquet")
    optional_files = ("selection_report",)  # the report's plots, when there is a statistic to draw

    def needs(self, cfg) -> list[str]:
        need = method_needs(cfg.select)
        return ["ingest", "score", *(["target"] if need.target else []),
                *(["embed"] if _vectors_from_embed(cfg) else []), *(["similarity"] if need.neighbours else [])]

    def settings(self, cfg) -> tuple:
        return {k: v for k, v in asdict(cfg.select).items() if k != "memory_mb"}, cfg.seed  # memory picks nothing

    def run(self, ctx, out: Outputs) -> dict[str, Any]:
        from grads_ray.selection.budget import parse_budget
        from grads_ray.selection.choose import count_by, select

        cfg, sc = ctx.cfg, ctx.cfg.select
        t0 = time.time()
        device = "cuda" if sc.method == "fisher" and ctx.resources.torch_gpu(sc.fisher.use_gpu) else "cpu"
        spill = _spill_folder(out["select"])
        try:
            try:
                inputs = read_inputs(ctx, spill)
                res = select(inputs, parse_budget(sc.budget), sc, cfg.seed, device=device,
                             result=ColumnSpill(spill / "result"))
            except InputError:
                raise
            except ValueError as exc:  # a setting that does not fit this corpus: say which
                raise InputError(f"select: {exc}") from None
            select_s = time.time() - t0
            cols, ids = inputs.columns, inputs.ids
            write_selection(ctx.path("selection.parquet"), ids, res)
            stages = {**ctx.manifest.get("stages", {}), "select": {"method": sc.method, "budget": sc.budget}}
            selected, reason = res["selected"], res["reason"]
            write_report(ctx.path("selection_report.md"), cols, ids, selected, reason, (inputs.similarity or {}).get("dup_group"),
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
            write_selected(ctx.path("selected.jsonl"), ctx.path("selected.parquet"), out["select"], ctx.need("ingest").value.rows, ranked, seed=cfg.seed,
                           part_rows=cfg.data.shard_rows, spill=spill)
        finally:
            shutil.rmtree(spill, ignore_errors=True)
        return info

    def value(self, ctx, out: Outputs, info: dict[str, Any]):
        return ctx.path("selection.parquet")

    def check(self, ctx, done: Done) -> None:
        if done.info["selected"] == 0:
            why = ", ".join(f"{k} {v}" for k, v in done.info.get("not_selected_by_reason", {}).items())
            no_rows(ctx, f"select: no row selected of {done.info['scored']} (budget {done.info['budget']}"
                    + (f"; not selected: {why}" if why else "") + ")")


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
        raise InputError(f"no row of the corpus could be scored: see {ctx.path('rejected.jsonl')}")
    names = [c for c in stats_columns(score["stats"], need.columns) if c != "id"]
    inputs = SelectionInputs(PartColumns(names, order.column, cached=BASE_COLUMNS), ids,
                             source=aligned_sources(ctx.need("ingest").value.rows, order))
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


def _row(width: int) -> tuple[int]:
    """A vector column's per-row shape when its field does not say (written before shapes were)."""
    return (width,)


def _spill_folder(stage: StageDir) -> Path:
    """Where feature matrices too big for memory are memory-mapped: the stage's ledger when the
    run folder is local, else a local temporary folder."""
    if storage.is_remote(stage.path):
        return Path(tempfile.mkdtemp(prefix="grads-ray-spill-"))
    return Path(stage.ledger) / "spill"
