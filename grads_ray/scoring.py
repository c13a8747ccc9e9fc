"""Score stage plumbing (Ray Data): units of rows -> read + tokenize (CPU tasks) -> scorer actors,
which write what they score -> per-shard Parquet.

Work is cut into units (a shard's rows in runs of ``8 * score.batch_size``). A CPU task reads a unit
and tokenizes it into one packed item (Arrow IPC bytes), so that the scorer is handed exactly one
unit per call whatever blocks Ray Data forms: each call is bounded, and output flows unit by unit
(no call comes near Ray Data's no-progress timeout). The scorer actor writes the unit's scored rows
where it runs, atomically, to ``stats/.ledger/units/SSSSS/AAAAAAAAA.parquet``, and hands the driver
a receipt (shard, start, rows, node). When a shard's units are all written, a Ray task (not the
driver) merges them into the shard's ``stats/part-*.parquet`` (the public stats table),
``features/part-*.parquet`` (hidden-state and projected-gradient features) and tokenization rejects,
marks the shard done and deletes its units. The driver only counts receipts: no scored row passes
through it. A rerun scores only the units not yet written, and a unit's numbers depend on its rows
alone, so a resumed run is bit-identical to an uninterrupted one. The numbers come from
``gradients.engine`` (or ``gradients.stats`` for ``score.engine=loop``).
"""

from __future__ import annotations

import json
import logging
import math
import os
import time
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


def read_unit(path: str, start: int, unit_rows: int) -> pa.Table:
    """A unit of work -> rows ``[start, start + unit_rows)`` of the rows part ``path``, each with
    ``pos``, its index in the shard. Units start at multiples of ``unit_rows`` whatever else is being
    scored, and the scorer cuts its batches inside units, so a row's batch mates never depend on
    which shards a run had left to do."""
    t = read_slice(path, start, start + unit_rows)
    return t.append_column("pos", pa.array(np.arange(start, start + t.num_rows, dtype=np.int64)))


def tokenize(ds, *, model_path: str, max_length: int, on_long: str, batch_size: int, trust_remote_code: bool = False):
    """Add ``input_ids``/``labels`` (or a reject ``reason``) to a dataset of rows, in CPU tasks."""
    return ds.map_batches(tokenize_batch, batch_size=batch_size, batch_format="numpy",
                          fn_kwargs={"model_path": model_path, "max_length": max_length, "on_long": on_long,
                                     "trust_remote_code": trust_remote_code})


FEATURE_COLUMNS = ("hidden_mean", "grad_proj", "fisher_factor", "fisher_energy")


def engine_settings(score_cfg: Any, seed: int) -> dict[str, Any]:
    """The score config keys the engine reads (these, with the model, decide every number written)."""
    keys = ("engine", "dtype", "extrema", "proj_dim", "proj_rank", "chunk_elements", "fisher_dim", "fisher_rank",
            "response_only_loss", "check_tolerance")
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
                 hooks: dict[str, Any] | None = None, check: list[tuple[list[int], list[int]]] | None = None):
        import torch
        from transformers import AutoModelForCausalLM

        from grads_ray.gradients.selfcheck import ModelRefused, build_engine, synthetic_examples
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
        self.pad_id = self.model.config.pad_token_id or 0
        if isinstance(self.pad_id, list):
            self.pad_id = self.pad_id[0]
        # The engine, decided on this model on this device before any corpus row (gradients/selfcheck.py):
        # batched after its self-check on ``check`` (a few corpus rows), else the per-example loop
        # (score.engine=auto) or a refusal handed to the driver with the first receipt (batched).
        self.mode = settings.get("engine", "auto")
        tolerance = settings.pop("check_tolerance", None)
        self.refusal = ""
        vocab_size = self.model.get_input_embeddings().num_embeddings
        examples = [(list(x), list(y)) for x, y in (check or [])] or synthetic_examples(vocab_size)
        if self.hooks.get("perturb"):
            _perturb_rule(self.hooks["perturb"], self.hooks.get("factor", 1.3))
        try:
            self.engine, self.check = build_engine(self.model, settings, examples, self.pad_id, tolerance)
        except ModelRefused as exc:
            self.refusal = str(exc)
            settings["engine"] = "loop"  # (shapes below only; nothing is scored)
            self.engine, self.check = build_engine(self.model, settings, examples, self.pad_id)
            self.check.reason = self.refusal
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
            got = self._score(ids.to(self.device), lab.to(self.device), mask.to(self.device))
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

    def _score(self, ids, lab, mask):
        """One engine batch. A batch the batched engine cannot place (a layout its self-check did not
        meet) is scored one example at a time, and so is every batch after it (``auto``); under
        ``batched`` it is a refusal."""
        from grads_ray.gradients.rules import UnsupportedModel
        from grads_ray.gradients.selfcheck import ModelRefused
        from grads_ray.gradients.stats import LoopGradStats

        try:
            return self.engine(ids, lab, mask, left_padded=False)  # pad_batch pads on the right
        except UnsupportedModel as exc:
            if self.mode == "batched":
                raise ModelRefused(f"score.engine=batched: {exc}") from None
            log.warning("[grads-ray] score: %s; scoring one example at a time from here on (score.engine=auto)", exc)
            engine = self.engine
            self.engine = LoopGradStats(self.model, proj_dim=engine.projector.dim if engine.projector else 0,
                                        proj_rank=engine.projector.rank if engine.projector else 8,
                                        seed=engine.projector.seed if engine.projector else 0,
                                        fisher_dim=engine.fisher_proj.shape[0] if engine.fisher_rank else 0,
                                        fisher_rank=engine.fisher_rank)
            self.check.engine, self.check.reason = "loop", f"{self.check.reason}; then on a corpus batch: {exc}"
            return self.engine(ids, lab, mask, left_padded=False)

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


def perturbed_add(real, name: str, factor: float):
    """For the tests: ``BatchedGradStats._add`` with every term of parameter ``name`` scaled by
    ``factor``, a rule made wrong on purpose for the self-check to find."""
    import dataclasses

    import torch

    from grads_ray.gradients import factored

    def scaled_term(term):
        if isinstance(term, torch.Tensor):
            return term * factor
        if isinstance(term, factored.Dense):
            return factored.Dense(term.left * factor, term.right)
        if isinstance(term, factored.Rows):
            return factored.Rows(term.index, term.right * factor)
        return factored.Slice(term.index, factored.Dense(term.term.left * factor, term.term.right))

    def scaled(held):  # the engine's held use: its left factor (δ or the input), or its formed value
        if held.left is not None:
            return dataclasses.replace(held, left=held.left * factor)
        return dataclasses.replace(held, value=scaled_term(held.value))

    return lambda self, state, n, term: real(self, state, n, scaled(term) if n == name else term)


def _perturb_rule(name: str, factor: float) -> None:
    """Test hook ``perturb``: :func:`perturbed_add` in this (scorer) process."""
    from grads_ray.gradients.engine import BatchedGradStats

    BatchedGradStats._add = perturbed_add(BatchedGradStats._add, name, factor)


def _test_hooks(hooks: dict[str, Any], call: int, batch: int) -> None:
    """Faults on demand, for the tests (JSON in ``GRADS_RAY_TEST_SCORER_HOOKS``, read by the driver):
    ``sleep`` seconds before each engine batch; ``crash_once`` (a flag file) with ``crash_at_call``:
    the actor process kills itself (SIGKILL) half-way through that block, once per flag file;
    ``perturb`` (a parameter name) with ``factor``: the batched engine's rule for it made wrong
    (:func:`_perturb_rule`), before the scorer's self-check; ``oom_at_call``: that call's first
    batch raises ``torch.OutOfMemoryError``, as a GPU does at a batch size that cannot fit."""
    import signal
    import time

    time.sleep(hooks.get("sleep", 0))
    if hooks.get("oom_at_call") == call and batch == 0:
        import torch

        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB (injected by a test)")
    flag = hooks.get("crash_once")
    if flag and call == hooks.get("crash_at_call", 1) and batch == 1 and not os.path.exists(flag):
        open(flag, "w").close()
        os.kill(os.getpid(), signal.SIGKILL)


def score_examples(model_path: str, examples: list[tuple[list[int], list[int]]], *, settings: dict[str, Any],
                   batch_size: int, use_gpu: bool = False, trust_remote_code: bool = False) -> dict[str, np.ndarray]:
    """Score a small, already tokenized set in one process with the corpus's scorer (same model,
    engine, projection and seeds): LESS's target set. -> {``loss`` (M,), ``grad_proj`` (M, k)}, or
    {``error``} when ``score.engine=batched`` refuses the model."""
    from grads_ray.gradients.selfcheck import pick_rows

    scorer = Scorer(model_path, use_gpu=use_gpu, trust_remote_code=trust_remote_code, settings=settings,
                    batch_size=batch_size, check=pick_rows(examples))
    if scorer.refusal:  # the driver raises it (a Ray task's exception would carry its traceback)
        return {"error": scorer.refusal}
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


# Units: packed for the scorer, written by it --------------------------------------------------------

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


def scored_table(out: dict[str, Any], shapes: dict[str, tuple[int, ...]]) -> pa.Table:
    """:class:`Scorer`'s output for one unit -> the table a unit file holds: the row's identity, its
    reject reason, statistics (float64) and features (float32 lists whose field carries
    the per-row shape)."""
    n = len(out["id"])
    fields, arrays = [], []
    for c, typ in (("id", pa.string()), ("source", pa.string()), ("line", pa.int64()), ("reason", pa.string()),
                   ("detail", pa.string()), ("truncated", pa.bool_()), ("node", pa.string())):
        fields.append(pa.field(c, typ))
        arrays.append(pa.array(list(out[c]) if typ == pa.string() else out[c], typ))
    for c in [c for c in out if c not in FEATURE_COLUMNS and not any(f.name == c for f in fields)
              and c != "shard"]:
        fields.append(pa.field(c, pa.float64()))  # counts too: NaN for rejected rows (cast once they are out)
        arrays.append(pa.array(np.asarray(out[c], np.float64)))
    for name in FEATURE_COLUMNS:
        if name in out:
            values = np.asarray(out[name], np.float32).reshape(n, -1)
            if name == "fisher_energy":
                fields.append(pa.field(name, pa.float32()))
                arrays.append(pa.array(values[:, 0]))
            else:
                fields.append(shaped_field(name, tuple(shapes[name])))
                arrays.append(pa.ListArray.from_arrays(pa.array(np.arange(n + 1, dtype=np.int32) * values.shape[1]),
                                                       pa.array(values.reshape(-1))))
    return pa.Table.from_arrays(arrays, schema=pa.schema(fields))


class ScorerFailed(RuntimeError):
    """An error of the scorer that would happen again if retried (a model that cannot load, out of
    memory at this batch size, a bad setting): the run stops with its one line, exit 2."""


TRANSIENT = (ConnectionError, TimeoutError)  # may pass: raised, so Ray's and the run's retries apply


def failure_line(exc: BaseException, *, when: str, batch_size: int | None = None) -> str:
    """One line for an error the scorer raised: what it was doing, the exception's type and first
    line, and for out of memory the setting to lower."""
    first = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
    line = f"score: {when}: {type(exc).__name__}" + (f": {first}" if first else "")
    if _is_oom(exc):
        line += (f"; lower score.batch_size (now {batch_size})" if batch_size else "") + \
            " or score.chunk_elements, or give the scorer more memory"
    return line


def _is_oom(exc: BaseException) -> bool:
    import torch

    return isinstance(exc, (MemoryError, torch.OutOfMemoryError)) or "out of memory" in str(exc).lower()


class UnitScorer:
    """Ray Data callable class: packed units in (one a call), each scored by a :class:`Scorer` and
    written to its unit file, atomically; -> a receipt per unit (``shard, start, rows, node``, and
    ``error``/``failure`` lines).

    A lost process is a fault: the run scores the unwritten units again. An exception the scorer
    raises is not (it would recur): the scorer stays up, writes nothing more, and hands the error to
    the driver in its receipts, which stops the run with that line (``failure``; a refusal of the
    model under ``score.engine=batched`` is ``error``). Only :data:`TRANSIENT` errors are raised."""

    def __init__(self, units: str, **scorer_kwargs: Any):
        from grads_ray import storage

        self.units = storage.location(units)
        self.batch_size = scorer_kwargs.get("batch_size")
        self.failure, self.node = "", node_id()
        try:
            self.scorer = Scorer(**scorer_kwargs)
        except TRANSIENT:
            raise
        except Exception as exc:  # noqa: BLE001 - an error that would recur: a receipt, not a dead actor
            self.scorer = None
            self.failure = failure_line(exc, when=f"the scorer could not start on {scorer_kwargs.get('model_path')}",
                                        batch_size=self.batch_size)
            log.error("[grads-ray] %s", self.failure, exc_info=True)  # the whole traceback in the worker's log

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        from grads_ray.gradients.selfcheck import ModelRefused

        rows, error = [], self.scorer.refusal if self.scorer else ""
        for shard, start, data in zip(batch["shard"], batch["start"], batch["unit"], strict=True):
            if error or self.failure:  # nothing is written: the driver stops the run with this message
                rows.append(0)
                continue
            try:
                out = self.scorer(unpack_unit(data, int(shard)))
            except ModelRefused as exc:
                error = str(exc)
                rows.append(0)
                continue
            except TRANSIENT:
                raise
            except Exception as exc:  # noqa: BLE001 - see the class's docstring
                self.failure = failure_line(exc, when=f"scoring shard {int(shard)} (its rows from {int(start)})",
                                            batch_size=self.batch_size)
                log.error("[grads-ray] %s", self.failure, exc_info=True)
                rows.append(0)
                continue
            write_parquet(unit_file(self.units, int(shard), int(start)), scored_table(out, self.scorer.shapes))
            rows.append(len(out["id"]))
        n = len(rows)
        check = json.dumps(self.scorer.check.to_dict()) if self.scorer else "{}"
        return {"shard": np.asarray(batch["shard"], np.int64), "start": np.asarray(batch["start"], np.int64),
                "rows": np.asarray(rows, np.int64), "node": np.full(n, self.node, dtype=object),
                "error": np.full(n, error, dtype=object), "failure": np.full(n, self.failure, dtype=object),
                "check": np.full(n, check, dtype=object)}


def finish_shard(shard: int, stats: StageDir, features: StageDir) -> dict[str, Any]:
    """A shard whose units are all written -> its stats part (sorted by id), features part,
    tokenization rejects and marker; then its units are deleted. The same files whatever order the
    units were written in. -> the shard's ledger entry."""
    import pyarrow.parquet as pq

    from grads_ray import storage

    folder = stats.ledger / "units" / f"{shard:05d}"
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


# The pass loop ---------------------------------------------------------------------------------------

def units_of(expected: dict[int, int], unit_rows: int) -> dict[int, list[int]]:
    """shard -> its units' starts: multiples of ``unit_rows`` whatever else is being scored, so a
    unit (and so a row's batch mates) never depends on which shards a run had left to do."""
    return {s: list(range(0, n, unit_rows)) for s, n in expected.items()}


def rows_written(stats: StageDir, expected: dict[int, int], unit_rows: int) -> int:
    """Rows of unfinished shards whose units are already written (a resumed run does not score
    them again)."""
    got = written_units(stats.ledger / "units")
    return sum(min(unit_rows, expected[s] - a) for s, starts in got.items() if s in expected
               and not stats.is_done(s) for a in starts if a < expected[s])


def run_scoring(rows: StageDir, expected: dict[int, int], stats: StageDir, features: StageDir, *,
                model_path: str, max_length: int, on_long: str, batch_size: int, num_actors: int,
                use_gpu: bool, cpus: float, trust_remote_code: bool = False,
                settings: dict[str, Any] | None = None, progress=None, max_restarts: int = 3,
                check: list[tuple[list[int], list[int]]] | None = None) -> dict[str, Any]:
    """Score every row of the shards in ``expected`` (shard -> row count) not yet marked done, unit
    by unit; ``progress(rows)`` as units are written. ``cpus``: the cluster's, shared among CPU
    scorers (one each left for tokenizing). -> ``shards`` (the ledger entries of the shards finished
    by this run), ``units_scored`` and ``rows_scored`` (this run), ``units_resumed`` (found written
    by an interrupted run), ``first_unit_seconds`` (from the call to the first unit written).

    A scorer process that dies (a lost node, the OOM killer) fails the pass; the units it left
    unwritten are scored in a fresh pass. A pass that dies without writing a unit counts against
    ``max_restarts``, so a row that kills every scorer ends the run instead of looping, while a long
    run may lose scorers now and then. (Ray's own actor restarts are off: a restarted Ray Data actor
    needs its constructor arguments from the object store, which Ray warns it cannot guarantee,
    ray-project/ray#53727; a fresh pass needs nothing from the last one.)"""
    unit_rows = ROWS_PER_BLOCK_BATCHES * batch_size
    resumed = sum(len(v) for s, v in written_units(stats.ledger / "units").items()
                  if s in expected and not stats.is_done(s))
    result: dict[str, Any] = {"shards": [], "units_scored": 0, "rows_scored": 0, "units_resumed": resumed,
                              "first_unit_seconds": None}
    t0 = time.time()
    kw = {"model_path": model_path, "max_length": max_length, "on_long": on_long, "batch_size": batch_size,
          "num_actors": num_actors, "use_gpu": use_gpu, "cpus": cpus, "trust_remote_code": trust_remote_code,
          "settings": settings, "check": check}
    fruitless = 0  # passes that died without writing a unit
    while pending := {s: expected[s] for s in sorted(expected) if not stats.is_done(s)}:
        before = result["units_scored"]
        try:
            _score_pass(rows, pending, stats, features, progress, result, t0, unit_rows=unit_rows, **kw)
        except Exception as exc:  # noqa: BLE001 - only a dead scorer is retried; anything else re-raised
            fruitless = fruitless + 1 if result["units_scored"] == before else 0
            if fruitless > max_restarts or not scorer_died(exc):
                raise
            log.warning("[grads-ray] score: a scorer process died (%s); scoring the unwritten units of %d "
                        "shard(s) again in a fresh pass (passes that died without writing a unit: %d of at "
                        "most %d)", type(exc).__name__, sum(not stats.is_done(s) for s in pending), fruitless,
                        max_restarts)
    return result


def note_check(result: dict[str, Any], receipt: dict[str, Any]) -> None:
    """Each scorer's self-check (gradients/selfcheck.py), once per node and verdict, into
    ``result["checks"]``; a scorer that scores one example at a time though the configuration let it
    batch (``auto``) is logged by the driver too."""
    check = {"node": str(receipt["node"]), **json.loads(receipt["check"])}
    checks = result.setdefault("checks", [])
    if any((c["node"], c["engine"], c["reason"]) == (check["node"], check["engine"], check["reason"]) for c in checks):
        return
    checks.append(check)
    if check["engine"] == "loop" and check["reason"] != "score.engine=loop":
        log.warning("[grads-ray] score: %s; this scorer scores one example at a time (score.engine=auto)",
                    check["reason"])


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
                result: dict[str, Any], t0: float, *, unit_rows: int, model_path: str, max_length: int, on_long: str,
                batch_size: int, num_actors: int, use_gpu: bool, cpus: float, trust_remote_code: bool,
                settings: dict[str, Any] | None, check: list | None = None) -> None:
    """One Ray Data pass over the unwritten units of ``expected``'s shards (none done). A shard whose
    units are all written is merged by a Ray task (:func:`finish_shard`, :data:`FINISH_IN_FLIGHT` at
    a time) while scoring goes on; the pass returns only once every shard it finished is merged,
    their ledger entries in ``result["shards"]`` (after an error, once the merges under way have
    ended: the next pass merges the rest)."""

    units = stats.ledger / "units"
    have = written_units(units)
    todo = {s: [a for a in starts if a not in have.get(s, set())] for s, starts in units_of(expected, unit_rows).items()}
    finisher = _Finisher(stats, features, result["shards"])
    left = {s: len(v) for s, v in todo.items()}
    streamed = False
    try:
        for s in [s for s, n in left.items() if n == 0]:  # nothing left to score (or an empty shard)
            finisher.add(s)
        items = [{"shard": s, "start": a} for s in sorted(todo) for a in todo[s]]
        for receipt in _stream_receipts(items, rows, expected, units, unit_rows=unit_rows, model_path=model_path,
                                        max_length=max_length, on_long=on_long, batch_size=batch_size,
                                        num_actors=num_actors, use_gpu=use_gpu, cpus=cpus,
                                        trust_remote_code=trust_remote_code, settings=settings, check=check):
            if receipt["error"]:  # a scorer refused the model (score.engine=batched): one line, exit 2
                from grads_ray.gradients.selfcheck import ModelRefused

                raise ModelRefused(str(receipt["error"]))
            if receipt["failure"]:  # an error that would recur: one line, exit 2, no retry
                raise ScorerFailed(str(receipt["failure"]))
            note_check(result, receipt)
            s = int(receipt["shard"])
            left[s] -= 1
            result["units_scored"] += 1
            if result["first_unit_seconds"] is None:  # scoring start to the first unit on disk
                result["first_unit_seconds"] = round(time.time() - t0, 2)
            result["rows_scored"] += int(receipt["rows"])
            if progress:
                progress(int(receipt["rows"]))
            if left[s] == 0:
                finisher.add(s)
            finisher.poll(0)
        streamed = True
    finally:  # the shards being merged end first: a retried pass must not merge them twice
        finisher.drain(launch_queued=streamed)  # after an error, queued shards wait for the next pass
    if any(n for n in left.values()):
        missing = {s: n for s, n in left.items() if n}
        raise RuntimeError(f"scoring ended with units unwritten (per shard: {missing})")


FINISH_IN_FLIGHT = 2  # shards merged at once: their tasks hold no CPU, and the bound keeps Ray from
                     # starting a worker process for each


class _Finisher:
    """Merges shards whose units are all written (:func:`finish_shard`, as Ray tasks), a few at a
    time, while scoring goes on; each ledger entry appended to ``done`` as its task ends."""

    def __init__(self, stats: StageDir, features: StageDir, done: list[dict[str, Any]]):
        import ray

        self.task = ray.remote(num_cpus=0)(finish_shard)  # IO and a sort: it must not wait behind the scorers
        self.stats, self.features, self.done = stats, features, done
        self.queue: list[int] = []
        self.running: dict[Any, int] = {}

    def add(self, shard: int) -> None:
        self.queue.append(shard)
        self.poll(0)

    def poll(self, timeout: float | None, launch: bool = True) -> None:
        """Collect the tasks that have ended (waiting up to ``timeout``; None: for all), then start
        queued shards up to :data:`FINISH_IN_FLIGHT`."""
        import ray

        if self.running:
            ready, _ = ray.wait(list(self.running), num_returns=len(self.running), timeout=timeout)
            for ref in ready:
                self.running.pop(ref)
                self.done.append(ray.get(ref))
        while launch and self.queue and len(self.running) < FINISH_IN_FLIGHT:
            shard = self.queue.pop(0)
            self.running[self.task.remote(shard, self.stats, self.features)] = shard

    def drain(self, launch_queued: bool = True) -> None:
        """Wait for the running tasks and, unless told not to, merge every queued shard."""
        while self.running or (launch_queued and self.queue):
            self.poll(None, launch=launch_queued)


def _stream_receipts(items: list[dict[str, int]], rows: StageDir, expected: dict[int, int], units, *,
                     unit_rows: int, model_path: str, max_length: int, on_long: str, batch_size: int,
                     num_actors: int, use_gpu: bool, cpus: float, trust_remote_code: bool,
                     settings: dict[str, Any] | None, check: list | None = None):
    """The Ray Data pipeline over ``items`` (units): read and tokenize in CPU tasks, score and write
    in the actor pool. Yields a receipt (``shard, start, rows, node``) per unit written."""
    import ray

    if not items:
        return
    threads = max(1, int(cpus // max(num_actors, 1)) - 1) if not use_gpu else None
    # One item (and so one block) a unit; batch_size=1 downstream holds each call to one unit
    # whatever blocks Ray Data forms, so output flows unit by unit.
    ds = ray.data.from_items(items, override_num_blocks=len(items))
    # On a one-CPU cluster the scorer and the tasks that feed it share the CPU (half each): a whole
    # CPU for the scorer would leave its feeders none, and the pass would wait for ever.
    small = not use_gpu and cpus < 2
    ds = ds.map_batches(prepare_units, batch_size=1, batch_format="numpy", num_cpus=0.5 if small else 1,
                        fn_kwargs={"paths": {s: str(rows.part(s)) for s in expected}, "unit_rows": unit_rows,
                                   "model_path": model_path, "max_length": max_length, "on_long": on_long,
                                   "trust_remote_code": trust_remote_code})
    hooks = json.loads(os.environ[TEST_HOOKS_ENV]) if os.environ.get(TEST_HOOKS_ENV) else None
    # max_restarts=0: a dead scorer fails the pass and run_scoring scores the unwritten units again.
    # (Ray 2.60 has no named parameter for it and warns that the keyword route goes in 2.64.)
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*ray_remote_args.*deprecated")
        ds = ds.map_batches(
            UnitScorer, batch_size=1, batch_format="numpy",
            compute=ray.data.ActorPoolStrategy(min_size=1, max_size=max(num_actors, 1)),
            num_gpus=1 if use_gpu else 0, num_cpus=1 if use_gpu else (0.5 if small else max(1, threads or 1)),
            max_restarts=0,
            fn_constructor_kwargs={"units": str(units), "model_path": model_path, "use_gpu": use_gpu,
                                   "threads": threads, "trust_remote_code": trust_remote_code,
                                   "settings": settings, "batch_size": batch_size, "hooks": hooks,
                                   "check": check},
        )
    # Receipts in any order: a slow unit must not hold back those of the units behind it (the job
    # keeps order elsewhere, for training's sake: grads_ray/resources.py).
    ds.context.execution_options.preserve_order = False
    for batch in ds.iter_batches(batch_size=None, batch_format="numpy"):
        for i in range(len(batch["shard"])):
            yield {k: batch[k][i] for k in ("shard", "start", "rows", "node", "error", "failure", "check")}


def _empty_scored() -> pa.Table:
    cols = {c: pa.array([], pa.float64()) for c in STAT_BASE if c != "id"}
    return pa.table({"id": pa.array([], pa.string()), "source": pa.array([], pa.string()),
                     "line": pa.array([], pa.int64()), "reason": pa.array([], pa.string()),
                     "detail": pa.array([], pa.string()), "truncated": pa.array([], pa.bool_()),
                     "node": pa.array([], pa.string()), **cols})
