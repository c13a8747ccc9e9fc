"""The score stage's Ray plumbing: units of rows -> read + tokenize (CPU tasks) -> scorer actors,
which write what they score -> per-shard Parquet.

The scorer actor (:class:`UnitScorer`, around grads_ray/gradients/scorer.py's ``Scorer``) writes each
unit's scored rows where it runs, atomically (grads_ray/stages/score_units.py), and hands the driver a
receipt (shard, start, rows, node). When a shard's units are all written, a Ray task (not the driver)
merges them into the shard's ``stats/part-*.parquet`` (the public stats table),
``features/part-*.parquet`` (hidden-state and projected-gradient features) and tokenization rejects,
marks the shard done and deletes its units. The driver only counts receipts: no scored row passes
through it. A lost scorer process is a fault (the unwritten units are scored again in a fresh pass);
an error the scorer raises is not (it would recur): the run stops with its line.
"""

from __future__ import annotations

import json
import logging
import os
import time
import warnings
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from grads_ray.gradients.scorer import ROWS_PER_BLOCK_BATCHES, TEST_HOOKS_ENV, Scorer, scored_table
from grads_ray.resources import node_id
from grads_ray.rundir import StageDir, write_parquet
from grads_ray.stages.score_units import (
    finish_shard,
    prepare_units,
    unit_file,
    units_dir,
    units_of,
    unpack_unit,
    written_units,
)

log = logging.getLogger("grads_ray")


@dataclass(frozen=True)
class ScoringJob:
    """What every scorer of a run is given: the model, how rows are tokenized and batched, the
    engine's settings, where scorers run (``num_actors``; ``use_gpu``; ``cpus``: the cluster's,
    shared among CPU scorers, one each left for tokenizing) and the self-check's rows (``check``)."""

    model_path: str
    max_length: int
    on_long: str
    batch_size: int
    num_actors: int = 1
    use_gpu: bool = False
    cpus: float = 1.0
    trust_remote_code: bool = False
    settings: dict[str, Any] | None = None
    check: list[tuple[list[int], list[int]]] | None = field(default=None)
    unit_rows: int = 0  # rows of a unit; 0: ROWS_PER_BLOCK_BATCHES batches (a resumed pass keeps its first one's)

    def __post_init__(self) -> None:
        if not self.unit_rows:
            object.__setattr__(self, "unit_rows", ROWS_PER_BLOCK_BATCHES * self.batch_size)


class ScorerFailed(RuntimeError):
    """An error of the scorer that would happen again if retried (a model that cannot load, out of
    memory at this batch size, a bad setting): the run stops with its one line, exit 2."""


TRANSIENT = (ConnectionError, TimeoutError)  # may pass: raised, so Ray's and the run's retries apply


def failure_line(exc: BaseException, *, when: str, batch_size: int | None = None) -> str:
    """One line for an error the scorer raised: what it was doing, the exception's type and first
    line, for out of memory the setting to lower, for an op with no deterministic kernel the way out."""
    from grads_ray.determinism import explain

    hint = explain(exc)
    if hint:
        return f"score: {when}: {hint}"
    first = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
    line = f"score: {when}: {type(exc).__name__}" + (f": {first}" if first else "")
    from grads_ray.gradients.memory import out_of_memory

    if out_of_memory(exc):
        line += (f"; lower score.batch_size (now {batch_size}) or" if batch_size else "; lower") + \
            " score.chunk_elements, or give the scorer more memory"
    return line


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
            out["node"] = np.full(len(out["id"]), self.node, dtype=object)  # for the ledger, not the stats table
            write_parquet(unit_file(self.units, int(shard), int(start)), scored_table(out, self.scorer.shapes))
            rows.append(len(out["id"]))
        n = len(rows)
        check = json.dumps(self.scorer.check.to_dict()) if self.scorer else "{}"
        graphs = self.scorer.graphs if self.scorer else None  # score.cuda_graphs: this scorer's so far
        graphs = json.dumps({"scorer": f"{self.node}:{os.getpid()}", **graphs.totals()}) if graphs else ""
        return {"shard": np.asarray(batch["shard"], np.int64), "start": np.asarray(batch["start"], np.int64),
                "rows": np.asarray(rows, np.int64), "node": np.full(n, self.node, dtype=object),
                "error": np.full(n, error, dtype=object), "failure": np.full(n, self.failure, dtype=object),
                "check": np.full(n, check, dtype=object), "graphs": np.full(n, graphs, dtype=object)}


def run_scoring(rows: StageDir, expected: dict[int, int], stats: StageDir, features: StageDir, job: ScoringJob, *,
                progress=None, max_restarts: int = 3) -> dict[str, Any]:
    """Score every row of the shards in ``expected`` (shard -> row count) not yet marked done, unit
    by unit, as ``job`` says; ``progress(rows)`` as units are written. -> ``shards`` (the ledger entries of the shards finished
    by this run), ``units_scored`` and ``rows_scored`` (this run), ``units_resumed`` (found written
    by an interrupted run), ``first_unit_seconds`` (from the call to the first unit written).

    A scorer process that dies (a lost node, the OOM killer) fails the pass; the units it left
    unwritten are scored in a fresh pass. A pass that dies without writing a unit counts against
    ``max_restarts``, so a row that kills every scorer ends the run instead of looping, while a long
    run may lose scorers now and then. (Ray's own actor restarts are off: a restarted Ray Data actor
    needs its constructor arguments from the object store, which Ray warns it cannot guarantee,
    ray-project/ray#53727; a fresh pass needs nothing from the last one.)"""
    resumed = sum(len(v) for s, v in written_units(units_dir(stats)).items()
                  if s in expected and not stats.is_done(s))
    result: dict[str, Any] = {"shards": [], "units_scored": 0, "rows_scored": 0, "units_resumed": resumed,
                              "first_unit_seconds": None}
    t0 = time.time()
    fruitless = 0  # passes that died without writing a unit
    while pending := {s: expected[s] for s in sorted(expected) if not stats.is_done(s)}:
        before = result["units_scored"]
        try:
            _score_pass(rows, pending, stats, features, job, progress, result, t0)
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


def _score_pass(rows: StageDir, expected: dict[int, int], stats: StageDir, features: StageDir, job: ScoringJob,
                progress, result: dict[str, Any], t0: float) -> None:
    """One Ray Data pass over the unwritten units of ``expected``'s shards (none done). A shard whose
    units are all written is merged by a Ray task (:func:`finish_shard`, :data:`FINISH_IN_FLIGHT` at
    a time) while scoring goes on; the pass returns only once every shard it finished is merged,
    their ledger entries in ``result["shards"]`` (after an error, once the merges under way have
    ended: the next pass merges the rest)."""

    units = units_dir(stats)
    have = written_units(units)
    todo = {s: [a for a in starts if a not in have.get(s, set())]
            for s, starts in units_of(expected, job.unit_rows).items()}
    finisher = _Finisher(stats, features, result["shards"])
    left = {s: len(v) for s, v in todo.items()}
    streamed = False
    try:
        for s in [s for s, n in left.items() if n == 0]:  # nothing left to score (or an empty shard)
            finisher.add(s)
        items = [{"shard": s, "start": a} for s in sorted(todo) for a in todo[s]]
        for receipt in _stream_receipts(items, rows, expected, units, job):
            if receipt["error"]:  # a scorer refused the model (score.engine=batched): one line, exit 2
                from grads_ray.gradients.selfcheck import ModelRefused

                raise ModelRefused(str(receipt["error"]))
            if receipt["failure"]:  # an error that would recur: one line, exit 2, no retry
                raise ScorerFailed(str(receipt["failure"]))
            note_check(result, receipt)
            if receipt.get("graphs"):  # each scorer's latest totals (score.cuda_graphs)
                got = json.loads(receipt["graphs"])
                result.setdefault("graphs", {})[got.pop("scorer")] = got
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


def _stream_receipts(items: list[dict[str, int]], rows: StageDir, expected: dict[int, int], units, job: ScoringJob):
    """The Ray Data pipeline over ``items`` (units): read and tokenize in CPU tasks, score and write
    in the actor pool. Yields a receipt (``shard, start, rows, node``) per unit written."""
    import ray

    if not items:
        return
    use_gpu, num_actors = job.use_gpu, job.num_actors
    threads = max(1, int(job.cpus // max(num_actors, 1)) - 1) if not use_gpu else None
    # One item (and so one block) a unit; batch_size=1 downstream holds each call to one unit
    # whatever blocks Ray Data forms, so output flows unit by unit.
    ds = ray.data.from_items(items, override_num_blocks=len(items))
    # On a one-CPU cluster the scorer and the tasks that feed it share the CPU (half each): a whole
    # CPU for the scorer would leave its feeders none, and the pass would wait for ever.
    small = not use_gpu and job.cpus < 2
    ds = ds.map_batches(prepare_units, batch_size=1, batch_format="numpy", num_cpus=0.5 if small else 1,
                        fn_kwargs={"paths": {s: str(rows.part(s)) for s in expected}, "unit_rows": job.unit_rows,
                                   "model_path": job.model_path, "max_length": job.max_length,
                                   "on_long": job.on_long, "trust_remote_code": job.trust_remote_code})
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
            fn_constructor_kwargs={"units": str(units), "model_path": job.model_path, "use_gpu": use_gpu,
                                   "threads": threads, "trust_remote_code": job.trust_remote_code,
                                   "settings": job.settings, "batch_size": job.batch_size,
                                   "unit_rows": job.unit_rows, "hooks": hooks,
                                   "check": job.check},
        )
    # Receipts in any order: a slow unit must not hold back those of the units behind it (the job
    # keeps order elsewhere, for training's sake: grads_ray/resources.py).
    ds.context.execution_options.preserve_order = False
    for batch in ds.iter_batches(batch_size=None, batch_format="numpy"):
        for i in range(len(batch["shard"])):
            yield {k: batch[k][i] for k in ("shard", "start", "rows", "node", "error", "failure", "check", "graphs")}
