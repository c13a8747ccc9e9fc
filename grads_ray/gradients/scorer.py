"""The model adapter of the score stage: a Hugging Face causal LM loaded once, batches of tokenized
rows in, each row's loss, gradient statistics and features out, as columns.

:class:`Scorer` pads each batch, picks the engine on this model before any corpus row (the batched
exact engine after its self-check, else the per-example loop: gradients/selfcheck.py) and cuts its
batches inside units (a shard's rows in runs of ``ROWS_PER_BLOCK_BATCHES`` batches, or the size a
rerun kept) after sorting
them by length, so a row's batch mates, hence its float32 numbers, never depend on the run. No Ray
here: the score stage's plumbing (grads_ray/stages/score_pass.py) runs it in actors, the LESS target
set and ``grads-ray check-model`` in one process. The numbers come from ``gradients.engine`` (or
``gradients.stats`` for ``score.engine=loop``).
"""

from __future__ import annotations

import logging
import math
import os
from contextlib import nullcontext
from typing import Any

import numpy as np
import pyarrow as pa

from grads_ray import determinism
from grads_ray.columns import finite_mask, shaped_field
from grads_ray.data.batching import pad_batch
from grads_ray.gradients.features import mean_token_losses, response_only
from grads_ray.gradients.graphs import GraphedPass, graph_backend, pad_to, padded_length, same_attention

log = logging.getLogger("grads_ray")

ROWS_PER_BLOCK_BATCHES = 8  # rows per streamed block (a "unit"), in scorer batches


STAT_BASE = ["id", "n_tokens", "loss", "grad_norm", "grad_mean", "grad_std", "grad_max", "grad_min",
             "n_response_tokens", "loss_response_only"]


FEATURE_COLUMNS = ("hidden_mean", "grad_proj", "fisher_factor", "fisher_energy")


# settings that choose how the engine computes, not what: they move no number beyond rounding, so a shard
# scored with other values is not scored again (kept out of the score cache's key, stages/score.py)
ROUNDING_ONLY = ("chunk_elements", "fused_moments", "cuda_graphs", "deterministic")


def engine_settings(score_cfg: Any, seed: int, deterministic: bool) -> dict[str, Any]:
    """The score config keys the engine reads (these, with the model, decide every number written, but
    for :data:`ROUNDING_ONLY`)."""
    keys = ("engine", "dtype", "extrema", "proj_dim", "proj_rank", "chunk_elements", "fused_moments", "cuda_graphs",
            "fisher_dim", "fisher_rank", "response_only_loss", "check_tolerance")
    return {**{k: getattr(score_cfg, k) for k in keys}, "seed": seed, "deterministic": deterministic}


class Scorer:
    """Ray Data callable class: loads the model once, then scores batches of tokenized rows.

    ``__call__`` maps a batch (``id, shard, source, line, input_ids, labels, reason, detail``) to the
    same rows with ``n_tokens, loss, grad_*`` (overall and per group) and the features
    (``hidden_mean`` (n, d), ``grad_proj`` (n, p), ``fisher_factor`` (n, r, d'), ``fisher_energy``) added;
    rows rejected upstream pass through with NaN statistics and zero features.
    """

    def __init__(self, model_path: str, use_gpu: bool = False, threads: int | None = None,
                 trust_remote_code: bool = False, settings: dict[str, Any] | None = None, batch_size: int = 16,
                 hooks: dict[str, Any] | None = None, check: list[tuple[list[int], list[int]]] | None = None,
                 unit_rows: int | None = None):
        import torch
        from transformers import AutoModelForCausalLM

        from grads_ray.gradients.selfcheck import ModelRefused, build_engine, synthetic_examples
        from grads_ray.storage import local_model

        settings = dict(settings or {})
        self.response_only_loss = settings.pop("response_only_loss", False)
        cuda_graphs = settings.pop("cuda_graphs", False)
        # every pass (the self-check's, the corpus's, the batch size probe's) in deterministic kernels
        self.deterministic = settings.pop("deterministic", True)
        if self.deterministic:
            determinism.prepare()  # before this process's first cuBLAS call, where Ray's env did not
        # units as the score stage cuts them (read_unit): a resumed pass keeps its first pass's size
        self.batch_size, self.unit_rows = batch_size, unit_rows or ROWS_PER_BLOCK_BATCHES * batch_size
        if threads:
            torch.set_num_threads(threads)
        self.device = torch.device("cuda" if use_gpu and torch.cuda.is_available() else "cpu")
        dtype = settings.pop("dtype", "auto")
        if dtype == "auto":
            dtype = "bfloat16" if self.device.type == "cuda" else "float32"
        self.model = AutoModelForCausalLM.from_pretrained(
            local_model(model_path), dtype=getattr(torch, dtype), trust_remote_code=trust_remote_code,
            use_safetensors=True).to(self.device)
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
        with determinism.deterministic(self.deterministic):
            try:
                self.engine, self.check = build_engine(self.model, settings, examples, self.pad_id, tolerance)
            except ModelRefused as exc:
                self.refusal = str(exc)
                settings["engine"] = "loop"  # (shapes below only; nothing is scored)
                self.engine, self.check = build_engine(self.model, settings, examples, self.pad_id)
                self.check.reason = self.refusal
        # score.cuda_graphs: the batched engine's passes replayed from CUDA graphs, one per batch shape
        self.graphs = None
        if cuda_graphs and self.check.engine == "batched":
            backend = graph_backend(self.device)
            if backend is None:
                log.info("[grads-ray] score.cuda_graphs: no CUDA device here; every pass runs eagerly")
            else:
                from grads_ray.gradients.batch_size import probe_length

                self.graphs = GraphedPass(self.engine, backend)
                self.position_limit = probe_length(self.model, 1 << 30)  # learned positions: never padded past
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
        with determinism.deterministic(self.deterministic), same_attention() if self.graphs else nullcontext():
            return self._call(batch)

    def _call(self, batch: dict[str, np.ndarray]) -> dict[str, Any]:
        n = len(batch["id"])
        feats = {k: np.zeros((n, *shape), dtype=np.float32) for k, shape in self.shapes.items() if all(shape)}
        columns: dict[str, np.ndarray] = {}
        self.calls += 1
        for b, rows in enumerate(self.batches(batch)):
            if self.hooks:
                _test_hooks(self.hooks, self.calls, b)
            ids, lab, mask = pad_batch([batch["input_ids"][i] for i in rows], [batch["labels"][i] for i in rows],
                                       self.pad_id)
            if self.graphs is not None:  # one graph per multiple of LENGTH_STEP
                ids, lab, mask = pad_to(ids, lab, mask, self.graph_length(ids.shape[1]), self.pad_id)
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
        for c in sorted(set(columns) | {c for c in STAT_BASE if c != "id"}):
            out[c] = columns.get(c, np.full(n, math.nan))
        out.update({k: (v[:, 0] if k == "fisher_energy" else v) for k, v in feats.items()})
        return out

    def graph_length(self, t: int) -> int:
        """A batch of length t as ``score.cuda_graphs`` pads it: the next multiple of ``LENGTH_STEP``, within
        a learned-positions model's limit."""
        return max(t, min(padded_length(t), self.position_limit))

    def score_padded(self, ids, lab, mask):
        """A padded batch's whole work on the device, nothing kept: the engine's pass, and the
        response-only forward when it is on (what ``score.batch_size=auto`` measures; with graphs, the
        attention of a graphed scorer's passes)."""
        with determinism.deterministic(self.deterministic), same_attention() if self.graphs else nullcontext():
            got = self._score(ids, lab, mask)
            if self.response_only_loss:
                mean_token_losses(self.model, ids, lab, mask)
        return got

    def _score(self, ids, lab, mask):
        """One engine batch. A batch the batched engine cannot place (a layout its self-check did not
        meet) is scored one example at a time, and so is every batch after it (``auto``); under
        ``batched`` it is a refusal."""
        from grads_ray.gradients.rules import UnsupportedModel
        from grads_ray.gradients.selfcheck import ModelRefused
        from grads_ray.gradients.stats import LoopGradStats

        try:
            if self.graphs is not None:
                return self.engine.scores(self.graphs(ids, lab, mask))
            return self.engine(ids, lab, mask, left_padded=False)  # pad_batch pads on the right
        except UnsupportedModel as exc:
            if self.mode == "batched":
                raise ModelRefused(f"score.engine=batched: {exc}") from None
            self.graphs = None
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
    """For the tests: ``Reducer.add`` with every term of parameter ``name`` scaled by
    ``factor``, a rule made wrong on purpose for the self-check to find."""
    import dataclasses

    import torch

    from grads_ray.gradients import factored

    def scaled_term(term):
        if isinstance(term, torch.Tensor):
            return term * factor
        if isinstance(term, factored.Dense):
            return factored.Dense(term.left * factor, term.right)
        return factored.Rows(term.index, term.right * factor)

    def scaled(held):  # the engine's held use: its left factor (δ or the input), or its formed value
        if held.left is not None:
            return dataclasses.replace(held, left=held.left * factor)
        return dataclasses.replace(held, value=scaled_term(held.value))

    return lambda self, state, n, term: real(self, state, n, scaled(term) if n == name else term)


def _perturb_rule(name: str, factor: float) -> None:
    """Test hook ``perturb``: :func:`perturbed_add` in this (scorer) process."""
    from grads_ray.gradients.reduce import Reducer

    Reducer.add = perturbed_add(Reducer.add, name, factor)


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
    rule is selection's own (:func:`grads_ray.columns.finite_mask`)."""
    return finite_mask({c: table[c].to_numpy(zero_copy_only=False) for c in table.column_names if c != "id"})


def scored_table(out: dict[str, Any], shapes: dict[str, tuple[int, ...]]) -> pa.Table:
    """:class:`Scorer`'s output for one unit, with the ``node`` that scored it -> the table a unit
    file holds: the row's identity, its reject reason, statistics (float64) and features (float32
    lists whose field carries the per-row shape)."""
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
