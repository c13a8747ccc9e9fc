"""Score stage plumbing (Ray Data): rows -> tokenize (CPU tasks) -> scorer actor pool -> per-shard Parquet.

The driver consumes the stream and writes each shard's ``stats/part-*.parquet`` (the public stats
table), ``features/part-*.parquet`` (mean last hidden state) and tokenization rejects as soon as all of
the shard's rows have come back, then marks the shard done: a rerun scores only unfinished shards.
"""

from __future__ import annotations

import json
import math
from collections import defaultdict
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from grads_ray.data.batching import pad_batch
from grads_ray.data.formats import RowError, normalize
from grads_ray.data.tokenize import encode, load_tokenizer
from grads_ray.ingest import ROWS_SCHEMA
from grads_ray.rundir import StageDir, write_jsonl, write_parquet

ROWS_PER_BLOCK_BATCHES = 8  # rows per streamed block, in scorer batches
ROW_COLUMNS = ROWS_SCHEMA.names  # the ingested rows table
STAT_BASE = ["id", "n_tokens", "loss", "grad_norm", "grad_mean", "grad_std", "grad_max", "grad_min",
             "n_response_tokens"]


def tokenize_batch(batch: dict[str, np.ndarray], model_path: str, max_length: int, on_long: str,
                   trust_remote_code: bool = False) -> dict[str, Any]:
    """Rows -> ``input_ids``/``labels`` (lists) or a reject ``reason``. Stateless; the tokenizer is
    cached per worker process."""
    tokenizer = load_tokenizer(model_path, trust_remote_code)
    ids_out, labels_out, reasons, details = [], [], [], []
    for record in batch["record"]:
        try:
            ids, labels = encode(normalize(json.loads(record)), tokenizer, max_length, on_long)
            reason = detail = ""
        except RowError as err:
            ids, labels, reason, detail = [], [], err.reason, err.detail
        ids_out.append(np.asarray(ids, dtype=np.int64))
        labels_out.append(np.asarray(labels, dtype=np.int64))
        reasons.append(reason)
        details.append(detail)
    keep = {k: batch[k] for k in ("id", "shard", "source", "line")}
    return {**keep, "input_ids": ids_out, "labels": labels_out, "reason": np.array(reasons, dtype=object),
            "detail": np.array(details, dtype=object)}


def read_rows(files: list[str]):
    """Ray Data dataset over ingested rows tables (``rows/part-*.parquet``)."""
    import ray

    return ray.data.read_parquet(files).select_columns(ROW_COLUMNS)


def tokenize(ds, *, model_path: str, max_length: int, on_long: str, batch_size: int, trust_remote_code: bool = False):
    """Add ``input_ids``/``labels`` (or a reject ``reason``) to a dataset of rows, in CPU tasks."""
    return ds.map_batches(tokenize_batch, batch_size=batch_size, batch_format="numpy",
                          fn_kwargs={"model_path": model_path, "max_length": max_length, "on_long": on_long,
                                     "trust_remote_code": trust_remote_code})


class Scorer:
    """Ray Data callable class: loads the model once, then scores batches of tokenized rows.

    ``__call__`` maps a batch (``id, shard, source, line, input_ids, labels, reason, detail``) to the
    same rows with ``n_tokens, loss, grad_*`` (overall and per group) and ``hidden`` added; rows
    rejected upstream pass through with NaN statistics.
    """

    def __init__(self, model_path: str, use_gpu: bool = False, threads: int | None = None,
                 trust_remote_code: bool = False):
        import torch
        from transformers import AutoModelForCausalLM

        if threads:
            torch.set_num_threads(threads)
        self.device = torch.device("cuda" if use_gpu and torch.cuda.is_available() else "cpu")
        self.model = AutoModelForCausalLM.from_pretrained(
            model_path, dtype=torch.float32, trust_remote_code=trust_remote_code).to(self.device)
        self.model.eval()  # no dropout: the gradient of the loss as the model stands
        self.pad_id = self.model.config.pad_token_id or 0
        self.hidden_size = self.model.get_input_embeddings().embedding_dim

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, Any]:
        from grads_ray.gradients.stats import batch_stats

        ok = [i for i, r in enumerate(batch["reason"]) if not r]
        n = len(batch["id"])
        rows: list[dict[str, float]] = [{} for _ in range(n)]
        hidden = np.zeros((n, self.hidden_size), dtype=np.float32)
        if ok:
            ids, lab, mask = pad_batch([batch["input_ids"][i] for i in ok], [batch["labels"][i] for i in ok],
                                       self.pad_id)
            got, feats = batch_stats(self.model, ids.to(self.device), lab.to(self.device), mask.to(self.device))
            for j, i in enumerate(ok):
                rows[i] = got[j]
                hidden[i] = feats[j]
        columns = sorted({k for r in rows for k in r} | {c for c in STAT_BASE if c != "id"})
        out = {k: batch[k] for k in ("id", "shard", "source", "line", "reason", "detail")}
        for c in columns:
            out[c] = np.array([r.get(c, math.nan) for r in rows], dtype=np.float64)
        out["hidden"] = hidden
        return out


def _flush_shard(shard: int, tables: list[pa.Table], stats: StageDir, features: StageDir) -> dict[str, Any]:
    """Write one finished shard: stats (sorted by id), features, tokenization rejects, marker."""
    table = pa.concat_tables(tables, promote_options="default")
    ok = pc.equal(table["reason"], "")
    good = table.filter(ok)
    good = good.take(pc.sort_indices(good["id"]))
    group_cols = sorted(c for c in good.column_names if "." in c)
    write_parquet(stats.part(shard), good.select(STAT_BASE + group_cols).cast(
        pa.schema([(c, pa.string() if c == "id" else (pa.int64() if c.startswith("n_") else pa.float64()))
                   for c in STAT_BASE + group_cols])))
    hid = [np.asarray(v, dtype=np.float32) for v in good["hidden"].to_numpy(zero_copy_only=False)]
    write_parquet(features.part(shard), pa.table({"id": good["id"].cast(pa.string()),
                                                  "hidden_mean": pa.array(hid, pa.list_(pa.float32()))}))
    bad = table.filter(pc.invert(ok)).select(["id", "source", "line", "reason", "detail"]).to_pylist()
    write_jsonl(stats.part(shard, "rejected.jsonl"), [{**r, "stage": "score"} for r in bad])
    info = {"shard": shard, "scored": good.num_rows, "rejected": len(bad)}
    stats.mark_done(shard, info)
    features.mark_done(shard, info)
    return info


def run_scoring(rows: StageDir, expected: dict[int, int], stats: StageDir, features: StageDir, *,
                model_path: str, max_length: int, on_long: str, batch_size: int, num_actors: int,
                use_gpu: bool, tokenize_batch_size: int, trust_remote_code: bool = False,
                progress=None) -> list[dict[str, Any]]:
    """Score every row of the shards in ``expected`` (shard -> row count) not yet marked done."""
    import ray

    infos = []
    pending = [s for s in sorted(expected) if not stats.is_done(s)]
    for s in [s for s in pending if expected[s] == 0]:  # empty shards: nothing to stream
        infos.append(_flush_shard(s, [_empty_scored()], stats, features))
    pending = [s for s in pending if expected[s] > 0]
    if not pending:
        return infos
    cpus = ray.cluster_resources().get("CPU", 1)
    threads = max(1, int(cpus // max(num_actors, 1)) - 1) if not use_gpu else None
    ds = read_rows([str(rows.part(s)) for s in pending])
    # The reader may hand over several files as one block; cut it so scored rows stream back to the
    # driver (and finished shards reach disk) while scoring goes on, not all at the end.
    ds = ds.repartition(target_num_rows_per_block=ROWS_PER_BLOCK_BATCHES * batch_size)
    # Tokenizing runs in CPU tasks. With GPU scorers (num_gpus=1) Ray Data keeps the two operators
    # apart; on CPU-only clusters it fuses them into the scorer actor, which saves a copy per batch.
    ds = tokenize(ds, model_path=model_path, max_length=max_length, on_long=on_long,
                  batch_size=tokenize_batch_size, trust_remote_code=trust_remote_code)
    ds = ds.map_batches(
        Scorer, batch_size=batch_size, batch_format="numpy",
        compute=ray.data.ActorPoolStrategy(min_size=1, max_size=max(num_actors, 1)),
        num_gpus=1 if use_gpu else 0, num_cpus=1 if use_gpu else max(1, threads or 1),
        fn_constructor_kwargs={"model_path": model_path, "use_gpu": use_gpu, "threads": threads,
                               "trust_remote_code": trust_remote_code},
    )
    buffers: dict[int, list[pa.Table]] = defaultdict(list)
    counts: dict[int, int] = defaultdict(int)
    for batch in ds.iter_batches(batch_size=None, batch_format="pyarrow"):
        for s in pc.unique(batch["shard"]).to_pylist():
            part = batch.filter(pc.equal(batch["shard"], s))
            buffers[s].append(part)
            counts[s] += part.num_rows
            if counts[s] == expected[s]:
                infos.append(_flush_shard(s, buffers.pop(s), stats, features))
                if progress:
                    progress(infos[-1])
    if buffers:
        missing = {s: expected[s] - counts[s] for s in buffers}
        raise RuntimeError(f"scoring ended with shards incomplete (rows missing per shard: {missing})")
    return infos


def _empty_scored() -> pa.Table:
    cols = {c: pa.array([], pa.float64()) for c in STAT_BASE if c != "id"}
    return pa.table({"id": pa.array([], pa.string()), "source": pa.array([], pa.string()),
                     "line": pa.array([], pa.int64()), "reason": pa.array([], pa.string()),
                     "detail": pa.array([], pa.string()), **cols,
                     "hidden": pa.array([], pa.list_(pa.float32()))})
