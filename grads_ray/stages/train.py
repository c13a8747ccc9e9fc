"""warmup and finetune: the base model trained with Ray Train on a part of the corpus -> a model folder.

warmup: a short preliminary fine-tune on a seeded fraction of the ingested rows, so that the
gradients the score stage measures reflect the task. finetune: the base model trained on the rows
the select stage chose. Both:
1. read their rows: the warm-up's, the corpus with a seeded coin per id; the fine-tune's, the
   subset the select stage wrote (shuffled once, seeded), so its data path is O(selected rows);
2. tokenize them in Ray Data tasks, dropping rows the tokenizer rejects: once, before training, when
   they are small (``preload_mb``), else afresh each epoch;
3. train (grads_ray/training/): a rerun of the same stage and config resumes from its latest checkpoint;
4. save a Hugging Face folder, ``<stage>/model``, which later stages receive.
"""

from __future__ import annotations

import hashlib
import logging
from typing import Any

import numpy as np

from grads_ray.config import TrainConfig, recipe
from grads_ray.rundir import read_parts
from grads_ray.stages.base import Outputs, Stage
from grads_ray.storage import Location

log = logging.getLogger("grads_ray")


def stable_fraction(ids: list[str], seed: int, fraction: float) -> np.ndarray:
    """Deterministic per-id coin flips: True for about ``fraction`` of ids, the same for a seed;
    every id at ``fraction`` >= 1 (a whole epoch), none at 0."""
    if fraction >= 1.0:  # fraction * 2**64 rounds to 2**64, which no uint64 holds
        return np.ones(len(ids), bool)
    keys = [int.from_bytes(hashlib.blake2b(f"{seed}:{i}".encode(), digest_size=8).digest(), "big") for i in ids]
    return np.asarray(keys, dtype=np.uint64) < np.uint64(int(max(fraction, 0.0) * 2**64))


def pick_rows(batch: dict[str, np.ndarray], seed: int = 0, fraction: float = 1.0) -> dict[str, np.ndarray]:
    """Ray Data filter on raw rows, before tokenizing: a seeded fraction of ids."""
    keep = stable_fraction(list(batch["id"]), seed, fraction)
    return {k: v[keep] for k, v in batch.items()}


def training_columns(batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Tokenized rows without a reject reason, reduced to what the trainer reads."""
    keep = np.array([not r for r in batch["reason"]], dtype=bool)
    return {"input_ids": batch["input_ids"][keep], "labels": batch["labels"][keep]}


def preload_rows(files: list[str], pick: dict[str, Any] | None, limit_mb: float, block_rows: int = 256):
    """The ``id``/``record`` columns of ``files``, read here and filtered by ``pick``, in order, cut
    into tables of ``block_rows`` (one tokenizing task each): the rows :func:`training_dataset` would
    stream, when the files are on local disk and ``limit_mb`` holds their columns uncompressed (all
    of them: the warm-up's files are the whole corpus, before its seeded share). -> the tables, or
    None (stream them)."""
    import os

    import pyarrow as pa
    import pyarrow.parquet as pq

    if limit_mb <= 0 or not files or any("://" in f for f in files):
        return None
    size = 0
    for f in files:
        if os.path.getsize(f) > limit_mb * 2**20:  # compressed already too large: no need to look inside
            return None
        meta = pq.ParquetFile(f).metadata
        size += sum(meta.row_group(g).total_byte_size for g in range(meta.num_row_groups))
        if size > limit_mb * 2**20:
            return None
    tables = []
    for f in files:
        t = pq.read_table(f, columns=["id", "record"])
        if pick:
            t = t.filter(pa.array(stable_fraction(t["id"].to_pylist(), pick["seed"], pick["fraction"])))
        tables += [t.slice(i, block_rows) for i in range(0, t.num_rows, max(1, block_rows))]
    return tables or None  # no row at all: the streamed path, as before


def training_dataset(files: list[str], pick: dict[str, Any] | None, cfg, preload_mb: float = 0.0):
    """Ray Data dataset of ``input_ids``/``labels`` for training: the rows of ``files`` (Parquet with
    ``id`` and ``record``), filtered by ``pick`` when given, tokenized in CPU tasks as the scorers do
    (``cfg``: the job's config), rejected rows dropped. Rows that :func:`preload_rows` reads within
    ``preload_mb`` are tokenized once, here (a materialized dataset); others are read afresh each epoch.
    Either way the rows come in the same order."""
    import ray

    from grads_ray.data.tokenize import tokenize
    from grads_ray.resources import cpus_settled

    tables = preload_rows(files, pick, preload_mb, cfg.score.tokenize_batch_size)
    if tables is not None:
        ds = ray.data.from_arrow(tables)
    else:
        ds = ray.data.read_parquet(files).select_columns(["id", "record"])
        if pick:
            ds = ds.map_batches(pick_rows, batch_format="numpy", fn_kwargs=pick)
    ds = tokenize(ds, model_path=cfg.model.path, max_length=cfg.data.max_length, on_long=cfg.data.on_long,
                  batch_size=cfg.score.tokenize_batch_size, trust_remote_code=cfg.model.trust_remote_code)
    ds = ds.map_batches(training_columns, batch_format="numpy")
    if tables is None:
        return ds
    cpus_settled()  # a pass started while Ray still counts the last stage's CPUs busy warns it "will hang"
    return ds.materialize()


def train_on(ctx, stage: str, fp: str, out_model: Location, n_rows: int, files: list[str], pick: dict[str, Any] | None,
             tcfg: TrainConfig) -> dict[str, Any]:
    """Ray Train run ``STAGE-FP`` of the base model on the rows of ``files`` (Parquet with ``id`` and
    ``record``), filtered by ``pick`` when given (see :func:`pick_rows`): a rerun of the same stage
    and config (after a crash) resumes from its latest checkpoint; another config starts its own run.
    -> the final training metrics."""
    from grads_ray.training.trainer import train

    cfg, res = ctx.cfg, ctx.ray()
    base = cfg.model.path
    ds = training_dataset(files, pick, cfg, tcfg.preload_mb)
    return train(ds, n_rows, base, out_model, tcfg, name=f"{stage}-{fp[:16]}",
                 storage_path=ctx.path("ray_train"), seed=cfg.seed, use_gpu=res.gpu(tcfg.use_gpu),
                 nodes=res.node_cpus, trust_remote_code=cfg.model.trust_remote_code, deterministic=cfg.deterministic)


class Warmup(Stage):
    name, folders = "warmup", ("warmup",)
    about = "a short preliminary fine-tune on a seeded fraction of the rows: warmup/model"
    scratch = ("ray_train",)  # Ray Train's runs, one per stage and fingerprint: a rerun resumes from its checkpoint

    def needs(self, cfg) -> list[str]:
        return ["ingest"]

    def settings(self, cfg) -> tuple:
        return cfg.model.path, recipe(cfg.warmup), cfg.data.max_length, cfg.data.on_long, cfg.seed

    def run(self, ctx, out: Outputs) -> dict[str, Any]:
        cfg = ctx.cfg
        ids = read_parts(ctx.need("ingest").value.rows.parts(), ["id"])["id"].to_pylist()
        n = int(stable_fraction(ids, cfg.seed, cfg.warmup.fraction).sum())
        log.info("[grads-ray] warmup: fine-tuning %s on %d rows (%.0f%% of the corpus) before scoring it, as "
                 "GrADS does; warmup.enabled=false or score.model=%s scores it as it is",
                 cfg.model.path, n, 100 * cfg.warmup.fraction, cfg.model.path)
        files = [str(p) for p in ctx.need("ingest").value.rows.parts()]
        metrics = train_on(ctx, "warmup", out.fingerprint, out["warmup"].path / "model", n, files,
                           {"seed": cfg.seed, "fraction": cfg.warmup.fraction}, cfg.warmup)
        return {"rows": n, "metrics": metrics}

    def value(self, ctx, out: Outputs, info: dict[str, Any]) -> str:
        return str(out["warmup"].path / "model")


class Finetune(Stage):
    name, folders = "finetune", ("finetune",)
    about = "the base model fine-tuned on the selected rows: finetune/model"
    scratch = ("ray_train",)  # Ray Train's runs, one per stage and fingerprint: a rerun resumes from its checkpoint

    def needs(self, cfg) -> list[str]:
        return ["select"]

    def settings(self, cfg) -> tuple:
        return cfg.model.path, recipe(cfg.finetune), cfg.seed

    def run(self, ctx, out: Outputs) -> dict[str, Any]:
        from grads_ray.selection.writing import selected_rows

        select = ctx.need("select")
        n = select.info["selected"]
        metrics = train_on(ctx, "finetune", out.fingerprint, out["finetune"].path / "model", n,
                           selected_rows(select["select"]), None, ctx.cfg.finetune)
        return {"rows": n, "metrics": metrics}

    def value(self, ctx, out: Outputs, info: dict[str, Any]) -> str:
        return str(out["finetune"].path / "model")
