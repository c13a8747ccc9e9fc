"""Score stage plumbing (Ray Data): rows -> tokenize (CPU tasks) -> scorer actor pool -> per-shard Parquet.

Work is cut into units (a shard's rows in runs of ``8 * score.batch_size``), one Ray Data block
each, so each scorer call is bounded and rows come back while scoring goes on. The driver consumes
the stream and writes each shard's ``stats/part-*.parquet`` (the public stats
table), ``features/part-*.parquet`` (hidden-state and projected-gradient features) and tokenization
rejects as soon as all of the shard's rows have come back, then marks the shard done: a rerun scores
only unfinished shards. The numbers come from ``gradients.engine`` (or ``gradients.stats`` for
``score.engine=loop``).
"""

from __future__ import annotations

import json
import logging
import math
import os
import warnings
from collections import defaultdict
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from grads_ray.columns import shaped_field
from grads_ray.data.batching import pad_batch
from grads_ray.data.formats import RowError, normalize
from grads_ray.data.tokenize import encode, load_tokenizer
from grads_ray.gradients.features import mean_token_losses, response_only
from grads_ray.ingest import ROWS_SCHEMA, node_id
from grads_ray.rundir import StageDir, write_jsonl, write_parquet

log = logging.getLogger("grads_ray")

ROWS_PER_BLOCK_BATCHES = 8  # rows per streamed block (a "unit"), in scorer batches
ROW_COLUMNS = ROWS_SCHEMA.names  # the ingested rows table
STAT_BASE = ["id", "n_tokens", "loss", "grad_norm", "grad_mean", "grad_std", "grad_max", "grad_min",
             "n_response_tokens", "loss_response_only"]


def tokenize_batch(batch: dict[str, np.ndarray], model_path: str, max_length: int, on_long: str,
                   trust_remote_code: bool = False) -> dict[str, Any]:
    """Rows -> ``input_ids``/``labels`` (lists) or a reject ``reason``. Stateless; the tokenizer is
    cached per worker process."""
    tokenizer = load_tokenizer(model_path, trust_remote_code)
    ids_out, labels_out, reasons, details, truncated = [], [], [], [], []
    for record in batch["record"]:
        info: dict[str, Any] = {}
        try:
            ids, labels = encode(normalize(json.loads(record)), tokenizer, max_length, on_long, info)
            reason = detail = ""
        except RowError as err:
            ids, labels, reason, detail = [], [], err.reason, err.detail
        truncated.append("truncated_from" in info)
        ids_out.append(np.asarray(ids, dtype=np.int64))
        labels_out.append(np.asarray(labels, dtype=np.int64))
        reasons.append(reason)
        details.append(detail)
    keep = {k: batch[k] for k in ("id", "shard", "source", "line", "pos") if k in batch}
    return {**keep, "input_ids": ids_out, "labels": labels_out, "reason": np.array(reasons, dtype=object),
            "detail": np.array(details, dtype=object), "truncated": np.array(truncated, dtype=bool)}


def read_rows(files: list[str]):
    """Ray Data dataset over ingested rows tables (``rows/part-*.parquet``)."""
    import ray

    return ray.data.read_parquet(files).select_columns(ROW_COLUMNS)


def read_slice(path: str, start: int, stop: int) -> pa.Table:
    """Rows ``[start, stop)`` of a rows part, decoding only the row groups that hold them (ingest
    writes groups of ``grads_ray.ingest.ROW_GROUP_ROWS``)."""
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


def read_unit(batch: dict[str, np.ndarray], paths: dict[int, str], unit_rows: int) -> pa.Table:
    """A unit of work, ``(shard, start)``, -> that shard's rows ``[start, start + unit_rows)``, each
    with ``pos``, its index in the shard. Units start at multiples of ``unit_rows`` whatever else is
    being scored, and the scorer cuts its batches inside units, so they never depend on which shards
    a run had left to do. One unit a Ray Data block: each scorer call is one unit, so rows come back
    (and progress moves) unit by unit, and no call outlives Ray Data's no-progress timeout."""
    tables = []
    for shard, start in zip(batch["shard"], batch["start"], strict=True):
        t = read_slice(paths[int(shard)], int(start), int(start) + unit_rows)
        tables.append(t.append_column("pos", pa.array(np.arange(start, start + t.num_rows, dtype=np.int64))))
    return pa.concat_tables(tables)


def tokenize(ds, *, model_path: str, max_length: int, on_long: str, batch_size: int, trust_remote_code: bool = False):
    """Add ``input_ids``/``labels`` (or a reject ``reason``) to a dataset of rows, in CPU tasks."""
    return ds.map_batches(tokenize_batch, batch_size=batch_size, batch_format="numpy",
                          fn_kwargs={"model_path": model_path, "max_length": max_length, "on_long": on_long,
                                     "trust_remote_code": trust_remote_code})


FEATURE_COLUMNS = ("hidden_mean", "grad_proj", "fisher_factor", "fisher_energy")


def engine_settings(score_cfg: Any, seed: int) -> dict[str, Any]:
    """The score config keys the engine reads (these, with the model, decide every number written)."""
    keys = ("engine", "dtype", "extrema", "proj_dim", "proj_rank", "chunk_elements", "fisher_dim", "fisher_rank",
            "response_only_loss")
    return {**{k: getattr(score_cfg, k) for k in keys}, "seed": seed}


class Scorer:
    """Ray Data callable class: loads the model once, then scores batches of tokenized rows.

    ``__call__`` maps a batch (``id, shard, source, line, input_ids, labels, reason, detail``) to the
    same rows with ``n_tokens, loss, grad_*`` (overall and per group) and the features
    (``hidden_mean`` (n, d), ``grad_proj`` (n, p), ``fisher_factor`` (n, r, d'), ``fisher_energy``) added;
    rows rejected upstream pass through with NaN statistics and zero features.
    """

    def __init__(self, model_path: str, use_gpu: bool = False, threads: int | None = None,
                 trust_remote_code: bool = False, settings: dict[str, Any] | None = None, batch_size: int = 16,
                 hooks: dict[str, Any] | None = None):
        import torch
        from transformers import AutoModelForCausalLM

        from grads_ray.gradients.engine import BatchedGradStats
        from grads_ray.gradients.stats import LoopGradStats
        from grads_ray.storage import local_model

        settings = dict(settings or {})
        self.response_only_loss = settings.pop("response_only_loss", False)
        self.batch_size, self.unit_rows = batch_size, ROWS_PER_BLOCK_BATCHES * batch_size  # as read_unit cuts them
        if threads:
            torch.set_num_threads(threads)
        self.device = torch.device("cuda" if use_gpu and torch.cuda.is_available() else "cpu")
        dtype = settings.pop("dtype", "auto")
        if dtype == "auto":
            dtype = "bfloat16" if self.device.type == "cuda" else "float32"
        self.model = AutoModelForCausalLM.from_pretrained(
            local_model(model_path), dtype=getattr(torch, dtype), trust_remote_code=trust_remote_code,
            use_safetensors=True).to(self.device)
        self.node = node_id()
        self.hooks, self.calls = hooks or {}, 0
        self.model.eval()  # no dropout: the gradient of the loss as the model stands
        engine = LoopGradStats if settings.pop("engine", "batched") == "loop" else BatchedGradStats
        self.engine = engine(self.model, **settings)
        self.pad_id = self.model.config.pad_token_id or 0
        cfg = self.model.config
        vocab = self.model.get_input_embeddings().num_embeddings
        starts = [t[0] if isinstance(t, list) else t for t in (cfg.bos_token_id, cfg.eos_token_id, self.pad_id)]
        self.start_id = next((int(t) for t in starts if t is not None and 0 <= int(t) < vocab), 0)
        fisher = (self.engine.fisher_rank, self.engine.fisher_proj.shape[0]) if self.engine.fisher_rank else (0,)
        self.shapes = {"hidden_mean": (self.model.get_input_embeddings().embedding_dim,),
                       "grad_proj": (self.engine.projector.dim if self.engine.projector else 0,),
                       "fisher_factor": fisher, "fisher_energy": (1,)}  # each row's; 0: off

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, Any]:
        """A block of rows (whole units, any shards) -> the same rows scored. The engine's batches are
        cut inside each unit (rows of one shard with equal ``pos // unit_rows``) after sorting its rows
        by length, so little is spent on padding and a row's batch mates never depend on the run."""
        n = len(batch["id"])
        feats = {k: np.zeros((n, *shape), dtype=np.float32) for k, shape in self.shapes.items() if all(shape)}
        columns: dict[str, np.ndarray] = {}
        self.calls += 1
        for b, rows in enumerate(self.batches(batch)):
            if self.hooks:
                _test_hooks(self.hooks, self.calls, b)
            ids, lab, mask = pad_batch([batch["input_ids"][i] for i in rows], [batch["labels"][i] for i in rows],
                                       self.pad_id)
            got = self.engine(ids.to(self.device), lab.to(self.device), mask.to(self.device))
            for c, values in got.columns.items():
                columns.setdefault(c, np.full(n, math.nan))[rows] = values
            if self.response_only_loss:  # IFD's denominator: the response without its prompt
                alone = response_only([batch["input_ids"][i] for i in rows], [batch["labels"][i] for i in rows],
                                      self.start_id)
                a_ids, a_lab, a_mask = pad_batch(*alone, self.pad_id)
                columns.setdefault("loss_response_only", np.full(n, math.nan))[rows] = mean_token_losses(
                    self.model, a_ids.to(self.device), a_lab.to(self.device), a_mask.to(self.device))
            for k in feats:
                value = getattr(got, k)
                if value is not None:
                    feats[k][rows] = np.asarray(value, dtype=np.float32).reshape(len(rows), *self.shapes[k])
        out = {k: batch[k] for k in ("id", "shard", "source", "line", "reason", "detail")}
        out["truncated"] = batch["truncated"]
        out["node"] = np.full(n, self.node, dtype=object)  # for the ledger, not the stats table
        for c in sorted(set(columns) | {c for c in STAT_BASE if c != "id"}):
            out[c] = columns.get(c, np.full(n, math.nan))
        out.update({k: (v[:, 0] if k == "fisher_energy" else v) for k, v in feats.items()})
        return out

    def batches(self, batch: dict[str, np.ndarray]) -> list[list[int]]:
        """Row positions of each engine batch: per (shard, unit), the rows to score sorted by
        (length, pos), cut every ``batch_size``."""
        shard = np.asarray(batch["shard"], dtype=np.int64)
        pos = np.asarray(batch["pos"], dtype=np.int64)
        length = np.array([len(x) for x in batch["input_ids"]], dtype=np.int64)
        unit = pos // self.unit_rows
        order = np.lexsort((pos, length, unit, shard))
        order = order[[not batch["reason"][i] for i in order]]  # rejected rows pass through unscored
        cuts = np.flatnonzero(np.diff(shard[order]) | np.diff(unit[order])) + 1
        return [[int(i) for i in group[k:k + self.batch_size]] for group in np.split(order, cuts)
                for k in range(0, len(group), self.batch_size)]


TEST_HOOKS_ENV = "GRADS_RAY_TEST_SCORER_HOOKS"


def _test_hooks(hooks: dict[str, Any], call: int, batch: int) -> None:
    """Faults on demand, for the tests (JSON in ``GRADS_RAY_TEST_SCORER_HOOKS``, read by the driver):
    ``sleep`` seconds before each engine batch; ``crash_once`` (a flag file) with ``crash_at_call``:
    the actor process kills itself (SIGKILL) half-way through that block, once per flag file."""
    import signal
    import time

    time.sleep(hooks.get("sleep", 0))
    flag = hooks.get("crash_once")
    if flag and call == hooks.get("crash_at_call", 1) and batch == 1 and not os.path.exists(flag):
        open(flag, "w").close()
        os.kill(os.getpid(), signal.SIGKILL)


def score_examples(model_path: str, examples: list[tuple[list[int], list[int]]], *, settings: dict[str, Any],
                   batch_size: int, use_gpu: bool = False, trust_remote_code: bool = False) -> dict[str, np.ndarray]:
    """Score a small, already tokenized set in one process with the corpus's scorer (same model,
    engine, projection and seeds): LESS's target set. -> {``loss`` (M,), ``grad_proj`` (M, k)}."""
    scorer = Scorer(model_path, use_gpu=use_gpu, trust_remote_code=trust_remote_code, settings=settings,
                    batch_size=batch_size)
    m = len(examples)
    batch = {"id": np.array([str(i) for i in range(m)], dtype=object), "shard": np.zeros(m, np.int64),
             "source": np.array(["target"] * m, dtype=object), "line": np.arange(m), "pos": np.arange(m),
             "input_ids": [np.asarray(x, np.int64) for x, _ in examples],
             "labels": [np.asarray(y, np.int64) for _, y in examples],
             "reason": np.array([""] * m, dtype=object), "detail": np.array([""] * m, dtype=object),
             "truncated": np.zeros(m, dtype=bool)}
    out = scorer(batch)
    return {"loss": np.asarray(out["loss"], np.float64), "grad_proj": np.asarray(out["grad_proj"], np.float32)}


def finite_rows(table: pa.Table) -> np.ndarray:
    """(N,) True where the loss and every gradient statistic (overall and per group) is finite: a
    NaN or infinite value (an overflow, a broken example) is flagged here and never selected. The
    rule is selection's own (:func:`grads_ray.selection.select.finite_mask`)."""
    from grads_ray.selection.select import finite_mask

    return finite_mask({c: table[c].to_numpy(zero_copy_only=False) for c in table.column_names if c != "id"})


def _flush_shard(shard: int, tables: list[pa.Table], stats: StageDir, features: StageDir) -> dict[str, Any]:
    """Write one finished shard: stats (sorted by id), features, tokenization rejects, marker."""
    table = pa.concat_tables(tables, promote_options="default")
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
    fields, arrays = [pa.field("id", pa.string())], [good["id"].cast(pa.string())]
    for name in FEATURE_COLUMNS:
        if name in good.column_names:
            values = good[name].to_numpy(zero_copy_only=False)  # Ray's tensor column: each row flattened
            if name == "fisher_energy":
                fields.append(pa.field(name, pa.float32()))
                arrays.append(pa.array(values.astype(np.float32)))
            else:  # the per-row shape (FisherSFT's r x d' factor) in the field's metadata
                fields.append(shaped_field(name, tuple(good.schema.field(name).type.shape)))
                arrays.append(pa.array([np.asarray(v, dtype=np.float32).ravel() for v in values],
                                       pa.list_(pa.float32())))
    write_parquet(features.part(shard), pa.Table.from_arrays(arrays, schema=pa.schema(fields)))
    bad = table.filter(pc.invert(ok)).select(["id", "source", "line", "reason", "detail"]).to_pylist()
    write_jsonl(stats.rejects(shard), [{**r, "stage": "score"} for r in bad])
    nodes = sorted(set(table["node"].to_pylist()))
    info = {"shard": shard, "scored": good.num_rows, "rejected": len(bad), "nodes": nodes,
            "truncated": int(pc.sum(stats_table["truncated"]).as_py() or 0),
            "nonfinite": int(stats_table.num_rows - (pc.sum(stats_table["finite"]).as_py() or 0))}
    stats.mark_done(shard, info)
    features.mark_done(shard, info)
    return info


def run_scoring(rows: StageDir, expected: dict[int, int], stats: StageDir, features: StageDir, *,
                model_path: str, max_length: int, on_long: str, batch_size: int, num_actors: int,
                use_gpu: bool, cpus: float, trust_remote_code: bool = False,
                settings: dict[str, Any] | None = None, progress=None, max_restarts: int = 3
                ) -> list[dict[str, Any]]:
    """Score every row of the shards in ``expected`` (shard -> row count) not yet marked done;
    ``progress(rows)`` as scored rows come back. ``cpus``: the cluster's, shared among CPU scorers
    (one each left for tokenizing).

    A scorer process that dies (a lost node, the OOM killer) fails the pass; the shards it left
    unfinished are scored again in a fresh pass. A pass that dies without finishing a shard counts
    against ``max_restarts``, so a row that kills every scorer ends the run instead of looping, while
    a long run may lose scorers now and then. (Ray's own actor restarts are off: a restarted Ray
    Data actor needs its constructor arguments from the object store, which Ray warns it cannot
    guarantee, ray-project/ray#53727; a fresh pass needs nothing from the last one.)"""
    infos = []
    for s in [s for s in sorted(expected) if not stats.is_done(s) and expected[s] == 0]:
        infos.append(_flush_shard(s, [_empty_scored()], stats, features))  # empty shards: nothing to stream
    kw = {"model_path": model_path, "max_length": max_length, "on_long": on_long, "batch_size": batch_size,
          "num_actors": num_actors, "use_gpu": use_gpu, "cpus": cpus, "trust_remote_code": trust_remote_code,
          "settings": settings}
    fruitless = 0  # passes that died without finishing a shard
    while pending := [s for s in sorted(expected) if not stats.is_done(s)]:
        counted: dict[int, int] = defaultdict(int)  # rows reported this pass, per unfinished shard
        written = len(infos)
        try:
            _score_pass(rows, {s: expected[s] for s in pending}, stats, features, progress, counted, infos, **kw)
        except Exception as exc:  # noqa: BLE001 - only a dead scorer is retried; anything else re-raised
            fruitless = fruitless + 1 if len(infos) == written else 0
            if fruitless > max_restarts or not scorer_died(exc):
                raise
            lost = sum(n for s, n in counted.items() if not stats.is_done(s))
            if progress and lost:
                progress(-lost)  # those rows are scored again
            log.warning("[grads-ray] score: a scorer process died (%s); scoring the %d unfinished shard(s) "
                        "again in a fresh pass (passes that died without finishing a shard: %d of at most %d)",
                        type(exc).__name__, len(pending) - (len(infos) - written), fruitless, max_restarts)
    return infos


def scorer_died(exc: BaseException) -> bool:
    """Whether ``exc`` (or an exception it was raised from) says a Ray worker or actor process died,
    rather than that the code or the data is wrong."""
    import ray.exceptions as rex

    dead = tuple(getattr(rex, n) for n in ("RayActorError", "ActorDiedError", "ActorUnavailableError",
                                            "WorkerCrashedError", "NodeDiedError", "OwnerDiedError")
                 if hasattr(rex, n))
    seen: set[int] = set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        if isinstance(exc, dead) or isinstance(getattr(exc, "cause", None), dead):
            return True
        exc = exc.__cause__ or exc.__context__
    return False


def _score_pass(rows: StageDir, expected: dict[int, int], stats: StageDir, features: StageDir, progress,
                counted: dict[int, int], infos: list[dict[str, Any]], *, model_path: str, max_length: int,
                on_long: str, batch_size: int, num_actors: int, use_gpu: bool, cpus: float,
                trust_remote_code: bool, settings: dict[str, Any] | None) -> None:
    """One Ray Data pass over the units of ``expected``'s shards (all with rows, none done): each
    shard written as soon as all of its rows are back, its ledger entry appended to ``infos`` (also
    when the pass dies later); ``counted``: rows back per shard."""
    import ray

    threads = max(1, int(cpus // max(num_actors, 1)) - 1) if not use_gpu else None
    unit_rows = ROWS_PER_BLOCK_BATCHES * batch_size
    # One item (and so one block) a unit: scored rows stream back to the driver unit by unit, and a
    # row's batch mates are the same in a resumed run as in an uninterrupted one (batched float
    # arithmetic depends on them).
    units = [{"shard": s, "start": a} for s in sorted(expected) for a in range(0, expected[s], unit_rows)]
    ds = ray.data.from_items(units, override_num_blocks=len(units))
    ds = ds.map_batches(read_unit, batch_size=1, batch_format="numpy",
                        fn_kwargs={"paths": {s: str(rows.part(s)) for s in expected}, "unit_rows": unit_rows})
    # Tokenizing runs in CPU tasks, whole units at a time (batch_size=None keeps the units whole).
    # With GPU scorers (num_gpus=1) Ray Data keeps the two operators apart; on CPU-only clusters it
    # fuses them into the scorer actor, which saves a copy per batch.
    ds = tokenize(ds, model_path=model_path, max_length=max_length, on_long=on_long,
                  batch_size=None, trust_remote_code=trust_remote_code)
    hooks = json.loads(os.environ[TEST_HOOKS_ENV]) if os.environ.get(TEST_HOOKS_ENV) else None
    # max_restarts=0: a dead scorer fails the pass and run_scoring runs the unfinished shards again.
    # (Ray 2.60 has no named parameter for it and warns that the keyword route goes in 2.64.)
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*ray_remote_args.*deprecated")
        ds = ds.map_batches(
            Scorer, batch_size=None, batch_format="numpy",
            compute=ray.data.ActorPoolStrategy(min_size=1, max_size=max(num_actors, 1)),
            num_gpus=1 if use_gpu else 0, num_cpus=1 if use_gpu else max(1, threads or 1), max_restarts=0,
            fn_constructor_kwargs={"model_path": model_path, "use_gpu": use_gpu, "threads": threads,
                                   "trust_remote_code": trust_remote_code, "settings": settings,
                                   "batch_size": batch_size, "hooks": hooks},
        )
    buffers: dict[int, list[pa.Table]] = defaultdict(list)
    for batch in ds.iter_batches(batch_size=None, batch_format="pyarrow"):
        for s in pc.unique(batch["shard"]).to_pylist():
            part = batch.filter(pc.equal(batch["shard"], s))
            buffers[s].append(part)
            counted[s] += part.num_rows
            if progress:
                progress(part.num_rows)
            if counted[s] == expected[s]:
                infos.append(_flush_shard(s, buffers.pop(s), stats, features))
    if buffers:
        missing = {s: expected[s] - counted[s] for s in buffers}
        raise RuntimeError(f"scoring ended with shards incomplete (rows missing per shard: {missing})")


def _empty_scored() -> pa.Table:
    cols = {c: pa.array([], pa.float64()) for c in STAT_BASE if c != "id"}
    return pa.table({"id": pa.array([], pa.string()), "source": pa.array([], pa.string()),
                     "line": pa.array([], pa.int64()), "reason": pa.array([], pa.string()),
                     "detail": pa.array([], pa.string()), "truncated": pa.array([], pa.bool_()),
                     "node": pa.array([], pa.string()), **cols})
