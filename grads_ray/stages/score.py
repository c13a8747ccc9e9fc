"""score and target: per-example loss, gradient statistics and features, by scorer actors.

score, for every ingested row:
1. the scoring model: ``score.model`` when given, else the warm-up's when enabled, else the base;
2. shards whose rows were scored before by the same model and settings come from the shard cache;
3. the others stream through Ray Data (read and tokenize units -> scorer actor pool); scorers write
   each unit where they run, and a shard whose units are all written is merged into ``stats/part-*``
   and ``features/part-*`` by a Ray task; the driver only counts (grads_ray/stages/score_pass.py);
4. every shard goes into the cache for the next corpus version;
5. rejects of ingest and score are merged into ``rejected.jsonl``; every input row is checked to be
   scored or rejected exactly once.
target (``select.method=less``): the user's target rows scored in one task by the same model and
engine, for their projected gradients (``target/part-00000.parquet``).
"""

from __future__ import annotations

import json
import logging
import time
from collections import Counter
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa

from grads_ray import storage
from grads_ray.data.readers import InputError, file_digest
from grads_ray.rundir import ShardCache, StageDir, fingerprint, write_jsonl, write_parquet
from grads_ray.stages.base import AccountingError, Done, Outputs, Stage, no_rows, strict_error

log = logging.getLogger("grads_ray")


@dataclass
class ModelRef:
    """A model folder and the fingerprint that stands for its weights."""

    path: str
    fingerprint: str


def warms_up(cfg) -> bool:
    """Whether the scoring model is the warm-up's (no ``score.model`` pinned, warm-up enabled)."""
    return not cfg.score.model and cfg.warmup.enabled


def scoring_model(ctx) -> ModelRef:
    """The checkpoint the scorers read: ``score.model`` when given, else the warm-up's when enabled,
    else the base model."""
    cfg = ctx.cfg
    if warms_up(cfg):
        warm = ctx.need("warmup")
        return ModelRef(warm.value, warm.fingerprint)
    return ModelRef(cfg.score.model or cfg.model.path, _model_id(cfg))


def _model_id(cfg) -> str:
    """The fingerprint of a model scored as it is: ``score.model`` by its folder's listing, else the
    base model by its path (pinned to a commit when it is a Hub id)."""
    if cfg.score.model:
        return fingerprint("model-folder", cfg.score.model, storage.listing(storage.location(cfg.score.model)))
    return fingerprint("model", cfg.model.path)


def _engine_numbers(cfg) -> tuple:
    from grads_ray.gradients.scorer import ROUNDING_ONLY, engine_settings

    settings = engine_settings(cfg.score, cfg.seed, cfg.deterministic)
    return cfg.data.max_length, cfg.data.on_long, {k: v for k, v in settings.items() if k not in ROUNDING_ONLY}


def _numbers(ctx, model: ModelRef) -> str:
    """What decides a shard's numbers besides its rows (the key of the score cache, which outlives
    run folders): the model and the engine's settings but those that change no number beyond rounding
    (``scorer.ROUNDING_ONLY``: the memory bound, the choices of kernels)."""
    return fingerprint("score", model.fingerprint, *_engine_numbers(ctx.cfg))


def _layout(stats, todo: dict[int, int], cfg, job):
    """The job with this pass's unit size and batch size (:func:`unit_layout`): a rerun keeps its
    written units' size (said when another batch size makes another), a fresh pass takes
    ``score.batch_size``, measured on a GPU under ``auto`` (:func:`_measured_batch_size`)."""
    from grads_ray.gradients.batch_size import AUTO_CPU
    from grads_ray.gradients.scorer import ROWS_PER_BLOCK_BATCHES
    from grads_ray.stages.score_units import unit_layout

    setting = cfg.score.batch_size
    layout, kept = unit_layout(stats, set(todo), setting,
                               lambda: _measured_batch_size(cfg, job) if job.use_gpu else AUTO_CPU)
    if kept and layout.unit_rows != ROWS_PER_BLOCK_BATCHES * layout.batch_size:
        log.info("score: units of %d rows are written already; the rest are cut the same way and scored in "
                 "batches of %d (score.batch_size)%s", layout.unit_rows, min(layout.batch_size, layout.unit_rows),
                 "" if layout.batch_size <= layout.unit_rows else f", at most the unit's {layout.unit_rows}")
    return replace(job, batch_size=layout.batch_size, unit_rows=layout.unit_rows)


def _measured_batch_size(cfg, job) -> int:
    """``score.batch_size=auto`` on a GPU: the largest batch whose widest rows fit, measured in one
    task on one GPU with the scoring model (``gradients/batch_size.py``); recorded with the units.
    Whatever fails there stops the run with one line, as a scorer's failure does."""
    import ray

    from grads_ray.gradients.batch_size import describe, measure
    from grads_ray.stages.score_pass import TRANSIENT, ScorerFailed, failure_line

    task = ray.remote(num_cpus=1, num_gpus=1, max_calls=1)(measure)  # its worker exits: the GPU is the scorers' again
    try:
        got = ray.get(task.remote(job.model_path, settings=job.settings, max_length=cfg.data.max_length,
                                  trust_remote_code=job.trust_remote_code, check=job.check))
    except ray.exceptions.RayTaskError as exc:
        cause = exc.cause if isinstance(getattr(exc, "cause", None), BaseException) else exc
        if isinstance(cause, TRANSIENT):
            raise
        raise ScorerFailed(failure_line(cause, when=f"measuring the batch size (score.batch_size=auto) on "
                                                    f"{job.model_path}") + "; or set score.batch_size to an integer"
                           ) from None
    if "error" in got:
        raise ScorerFailed(got["error"])
    log.info("score: %s", describe(got))
    return int(got["batch_size"])


def _target_batch_size(setting: int | str, scored_with: int | None) -> int:
    """The target set's batch size: the setting, or under ``auto`` 16 at most and no more than the
    corpus was scored in (a measured size below 16 is what the GPU holds)."""
    from grads_ray.gradients.batch_size import AUTO_CPU

    if isinstance(setting, int):
        return setting
    return min(AUTO_CPU, scored_with) if scored_with else AUTO_CPU


class Score(Stage):
    name, folders = "score", ("stats", "features")
    about = "every row's loss, gradient statistics and features: stats/, features/, rejected.jsonl"
    files, scratch = ("rejected.jsonl",), ("score_cache",)
    private = ("rejected_by_reason",)  # the manifest's top level has it

    def needs(self, cfg) -> list[str]:
        return ["ingest", "warmup"] if warms_up(cfg) else ["ingest"]

    def settings(self, cfg) -> tuple:
        """The engine's settings and the model scored (the warm-up's: its fingerprint is a need's)."""
        return _engine_numbers(cfg), None if warms_up(cfg) else _model_id(cfg)

    def run(self, ctx, out: Outputs) -> dict[str, Any]:
        from grads_ray.gradients.batch_size import fixed_batch_size
        from grads_ray.gradients.scorer import engine_settings
        from grads_ray.progress import Progress
        from grads_ray.stages.score_pass import ScoringJob, run_scoring
        from grads_ray.stages.score_units import check_examples, rows_written, units_dir

        cfg, corpus, res = ctx.cfg, ctx.need("ingest").value, ctx.ray()
        stats, features = out["stats"], out["features"]
        model = scoring_model(ctx)
        numbers = _numbers(ctx, model)
        rows = {s.index: corpus.rows.done_info(s.index) for s in corpus.shards}
        expected = {i: info["rows"] for i, info in rows.items()}
        keys = {i: fingerprint(numbers, info.get("content")) for i, info in rows.items() if info.get("content")}
        cache = ShardCache(cfg.score.cache_dir or ctx.path("score_cache"))
        reused = _reuse_scored(cache, keys, stats, features)
        use_gpu = res.gpu(cfg.score.use_gpu)
        job = ScoringJob(model_path=model.path, max_length=cfg.data.max_length, on_long=cfg.data.on_long,
                         batch_size=fixed_batch_size(cfg.score.batch_size), num_actors=cfg.score.num_actors,
                         use_gpu=use_gpu,
                         cpus=res.cpus, trust_remote_code=cfg.model.trust_remote_code,
                         settings=engine_settings(cfg.score, cfg.seed, cfg.deterministic))
        todo = {s: n for s, n in expected.items() if not stats.is_done(s)}
        if todo:  # the rows the scorers check first, then the units' size (a rerun's are its first pass's)
            job = replace(job, check=check_examples(corpus.rows, todo, model_path=model.path,
                                                    max_length=cfg.data.max_length, on_long=cfg.data.on_long,
                                                    trust_remote_code=cfg.model.trust_remote_code,
                                                    n=cfg.score.check_rows))
            job = _layout(stats, todo, cfg, job)
        bar = Progress("score", sum(expected.values()), "rows",
                       done=sum(n for i, n in expected.items() if stats.is_done(i))
                       + rows_written(stats, expected, job.unit_rows))
        t0 = time.time()
        ran = run_scoring(corpus.rows, expected, stats, features, job, progress=bar.update,
                          max_restarts=cfg.score.max_restarts)
        bar.close()
        storage.rmtree(storage.location(units_dir(stats)))  # every unit merged; the layout record goes too
        for i, key in keys.items():  # every shard of this run, for the next corpus version
            if cache.get(key) is None:
                cache.put(key, _scored_files(stats, features, i), stats.done_info(i))
        done = [stats.done_info(s) for s in expected]
        by_reason = _merge_rejects(ctx.need("ingest")["rows"], stats, ctx.path("rejected.jsonl"))
        return {"rejected_by_reason": by_reason, "scored": sum(i["scored"] for i in done),
                "rejected": sum(i["rejected"] for i in done),
                "nodes": sorted({n for i in done for n in i.get("nodes", [])} - {""}),
                "truncated": sum(i.get("truncated", 0) for i in done),
                "nonfinite": sum(i.get("nonfinite", 0) for i in done),
                "model": model.path, "shards_this_run": len(ran["shards"]), "shards_reused": reused,
                "units_scored": ran["units_scored"], "units_resumed": ran["units_resumed"], "unit_rows": job.unit_rows,
                "batch_size": job.batch_size if todo else None,  # (none scored here: none chosen)
                "first_unit_seconds": ran["first_unit_seconds"],
                "engine": cfg.score.engine, "engine_used": sorted({c["engine"] for c in ran.get("checks", [])}),
                "self_check": ran.get("checks", []), "device": "gpu" if use_gpu else "cpu",
                **({"cuda_graphs": ran["graphs"]} if ran.get("graphs") else {}),
                "examples_per_s": round(ran["rows_scored"] / max(time.time() - t0, 1e-9), 2)}

    def value(self, ctx, out: Outputs, info: dict[str, Any]) -> ModelRef:
        """The model the scores are of (the target set is scored with it too)."""
        return scoring_model(ctx)

    def report(self, ctx, done: Done) -> dict[str, Any]:
        """The rejects by reason and the row accounting."""
        rows = ctx.need("ingest")
        by_reason = done.info.get("rejected_by_reason")
        if by_reason is None:  # a score stage finished before this entry was recorded
            by_reason = _count_reasons(ctx.path("rejected.jsonl"))
        return {"rejected_by_reason": by_reason,
                "accounting": {"input_rows": rows.info["rows"] + rows.info["rejected"],
                               "rejected_ingest": rows.info["rejected"], "rejected_score": done.info["rejected"],
                               "scored": done.info["scored"]}}

    def check(self, ctx, done: Done) -> None:
        """Every input row scored or rejected exactly once; ``--strict``; some row scored."""
        manifest = ctx.manifest  # with this stage's report (the runner records it before the check)
        acc = manifest["accounting"]
        got = acc["scored"] + acc["rejected_ingest"] + acc["rejected_score"]
        if got != acc["input_rows"]:
            raise AccountingError(
                f"score: row accounting does not add up: {acc['input_rows']} input rows, but {acc['scored']} scored "
                f"+ {acc['rejected_ingest']} rejected at ingest + {acc['rejected_score']} rejected at score = {got} "
                f"(a row {'lost' if got < acc['input_rows'] else 'counted twice'}: a defect of grads-ray; please "
                f"report it with the run folder's manifest.json). To score again, delete {done['stats'].path} and "
                f"{done['features'].path}")
        if ctx.cfg.data.strict and done.info["rejected"]:
            raise strict_error(done["stats"])
        if acc["scored"] == 0:
            reasons = ", ".join(f"{k} {v}" for k, v in manifest["rejected_by_reason"].items())
            no_rows(ctx, f"score: no row could be scored ({reasons}; see {ctx.path('rejected.jsonl')})")


def _merge_rejects(rows: StageDir, stats: StageDir, path: storage.Location) -> dict[str, int]:
    """Ingest's and score's rejects, in that order, into ``rejected.jsonl``. -> count by reason."""
    rejects: list[dict[str, Any]] = []
    for stage in (rows, stats):
        for part in stage.reject_parts():
            rejects += [json.loads(line) for line in part.read_text().splitlines() if line.strip()]
    write_jsonl(path, rejects)
    return dict(Counter(r["reason"] for r in rejects).most_common())


def _count_reasons(path: storage.Location) -> dict[str, int]:
    text = path.read_text() if path.exists() else ""
    return dict(Counter(json.loads(line)["reason"] for line in text.splitlines() if line.strip()).most_common())


def _scored_files(stats: StageDir, features: StageDir, shard: int) -> dict[str, storage.Location]:
    return {"stats.parquet": stats.part(shard), "features.parquet": features.part(shard),
            "rejected.jsonl": stats.rejects(shard)}


def _reuse_scored(cache: ShardCache, keys: dict[int, str], stats: StageDir, features: StageDir) -> int:
    """Shards whose rows and scoring were seen before (same key) take the cached files instead of
    being scored. -> how many."""
    n = 0
    for shard, key in keys.items():
        info = cache.get(key) if not stats.is_done(shard) else None
        if info is None:
            continue
        cache.restore(key, _scored_files(stats, features, shard))
        info = {**info, "shard": shard, "reused": True}
        features.mark_done(shard, info)
        stats.mark_done(shard, info)
        n += 1
    if n:
        log.info("[grads-ray] score: %d of %d shards taken from the cache %s", n, len(keys), cache.root)
    return n


class Target(Stage):
    name, folders = "target", ("target",)
    about = "LESS's target set scored by the same model: target/"

    def needs(self, cfg) -> list[str]:
        return ["score"]

    def settings(self, cfg) -> tuple:
        paths = cfg.select.less.target_paths
        return ([file_digest(p) if Path(p).is_file() else p for p in paths],)

    def run(self, ctx, out: Outputs) -> dict[str, Any]:
        import ray

        from grads_ray.data.tokenize import encode_files
        from grads_ray.gradients.scorer import engine_settings, score_examples

        cfg, res = ctx.cfg, ctx.ray()
        scored = ctx.need("score")
        paths, model = cfg.select.less.target_paths, scored.value
        target = encode_files(paths, model.path, cfg.data.max_length, "truncate",  # as held-out rows
                              cfg.model.trust_remote_code)
        if not target.examples:
            raise InputError(f"select.less.target_paths: no usable example in {paths} ({target.rejected} rejected)")
        use_gpu = res.gpu(cfg.score.use_gpu)
        task = ray.remote(num_cpus=1, num_gpus=1 if use_gpu else 0)(score_examples)
        got = ray.get(task.remote(model.path, target.examples, settings=engine_settings(cfg.score, cfg.seed, cfg.deterministic),
                                  batch_size=_target_batch_size(cfg.score.batch_size, scored.info.get("batch_size")),
                                  use_gpu=use_gpu,
                                  trust_remote_code=cfg.model.trust_remote_code))
        if "error" in got:
            from grads_ray.gradients.selfcheck import ModelRefused

            raise ModelRefused(got["error"])
        write_parquet(out["target"].part(0), pa.table({
            "id": pa.array(target.ids, pa.string()), "loss": pa.array(got["loss"]),
            "grad_proj": pa.array(list(got["grad_proj"].astype(np.float32)), pa.list_(pa.float32()))}))
        return {"examples": len(target.ids), "rejected": target.rejected}
