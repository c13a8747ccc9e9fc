"""The job: stages in order over one run directory, each skippable when already complete.

ingest -> warmup -> score -> similarity -> select -> finetune -> evaluate. Every stage can also be run
alone (``grads-ray STAGE``); it runs what it depends on first when that is missing. Each stage's
fingerprint covers its own config and its inputs' fingerprints, so a changed config recomputes exactly
the stages it affects. ``manifest.json`` records config, versions, counts, timings and input hashes.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import platform
import time
from collections import Counter
from dataclasses import asdict
from importlib import metadata
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import yaml

from grads_ray import storage
from grads_ray.columns import matrix
from grads_ray.config import Config, absolute_paths, recipe
from grads_ray.data.readers import InputError, Shard, file_digest, plan_shards
from grads_ray.progress import Progress
from grads_ray.rundir import (
    ShardCache,
    StageDir,
    fingerprint,
    read_json,
    read_parts,
    write_json,
    write_jsonl,
    write_parquet,
    write_text,
)

log = logging.getLogger("grads_ray")
_RUNTIME_ENV = {"HF_HUB_OFFLINE": "1", "TRANSFORMERS_VERBOSITY": "error", "TOKENIZERS_PARALLELISM": "false",
                "HF_DATASETS_OFFLINE": "1"}


def _versions() -> dict[str, str]:
    out = {"python": platform.python_version()}
    for pkg in ("grads-ray", "torch", "ray", "transformers", "tokenizers", "datasets", "pyarrow", "numpy",
                "faiss-cpu", "faiss-gpu-cu12"):
        with contextlib.suppress(metadata.PackageNotFoundError):
            out[pkg] = metadata.version(pkg)
    return out


def needs_similarity(cfg: Config) -> bool:
    """Whether the selection reads the similarity stage: GrADS, or near-duplicate capping asked for."""
    return cfg.select.method == "grads" or cfg.select.dedup == "true"


def _model_fingerprint(path: str) -> str:
    """A model folder's identity: its path and each file's name, size and version (time or ETag:
    cheap, and changed by any rewrite of the weights)."""
    return fingerprint("model-folder", path, storage.listing(storage.location(path)))


def _stable_fraction(ids: list[str], seed: int, fraction: float) -> np.ndarray:
    """Deterministic per-id coin flips: True for about ``fraction`` of ids, the same for a seed."""
    keys = [int.from_bytes(hashlib.blake2b(f"{seed}:{i}".encode(), digest_size=8).digest(), "big") for i in ids]
    return np.asarray(keys, dtype=np.uint64) < np.uint64(int(fraction * (2**64 - 1)))


def _pick_rows(batch: dict[str, np.ndarray], seed: int = 0, fraction: float = 1.0,
               ids: Any = None) -> dict[str, np.ndarray]:
    """Ray Data filter on raw rows, before tokenizing: a seeded fraction of ids, or an id set."""
    import ray

    keep = np.ones(len(batch["id"]), dtype=bool)
    if fraction < 1.0:
        keep &= _stable_fraction(list(batch["id"]), seed, fraction)
    if ids is not None:
        wanted = ray.get(ids) if isinstance(ids, ray.ObjectRef) else ids
        keep &= np.array([i in wanted for i in batch["id"]], dtype=bool)
    return {k: v[keep] for k, v in batch.items()}


def _training_columns(batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Tokenized rows without a reject reason, reduced to what the trainer reads."""
    keep = np.array([not r for r in batch["reason"]], dtype=bool)
    return {"input_ids": batch["input_ids"][keep], "labels": batch["labels"][keep]}


def _count_by(names: pa.Array, mask: np.ndarray) -> dict[str, int]:
    """How many rows under ``mask`` carry each name."""
    from grads_ray.selection.select import source_codes

    code, labels = source_codes(names)
    counts = np.bincount(code[mask], minlength=len(labels))
    return {label: int(c) for label, c in zip(labels, counts, strict=True) if c}


def _factor_shape(width: int, score_cfg: Any) -> tuple[int, int]:
    """(r, d') of the flattened FisherSFT factors: d' = min(fisher_dim, hidden), r = min(rank, d')."""
    r = score_cfg.fisher_rank
    if width % r == 0 and width // r >= r:
        return r, width // r
    d = int(round(width ** 0.5))
    return d, d


class Run:
    """One run directory and its configuration; the stages are methods."""

    def __init__(self, cfg: Config, verbose: bool = False):
        self.cfg = absolute_paths(cfg)  # Ray workers run elsewhere; a Config built in Python too
        self.verbose = verbose  # Ray workers' logs reach the terminal only when asked for
        self.out = storage.location(cfg.output)  # a folder or an object-store URL
        storage.makedirs(self.out)
        path = self.out / "manifest.json"
        self.manifest: dict[str, Any] = read_json(path) if path.exists() else {"stages": {}}
        self.manifest.update(config=cfg.to_dict(), versions=_versions())
        write_text(self.out / "config.yaml", yaml.safe_dump(cfg.to_dict(), sort_keys=False))
        self._fps: dict[str, str] = {}

    # ---------------------------------------------------------------------------------- plumbing
    def ensure_ray(self) -> None:
        import ray

        if not ray.is_initialized():
            self._start_ray(ray)
        ctx = ray.data.DataContext.get_current()
        ctx.enable_progress_bars = False
        ctx.print_on_execution_start = False
        # Rows reach the trainer in the same order every run, so a seed fixes the warm-up and with it
        # every score downstream (the scorer writes per shard and sorts by id, so order is moot there).
        ctx.execution_options.preserve_order = True

    def _start_ray(self, ray) -> None:
        os.environ.update(_RUNTIME_ENV)
        address = self.cfg.ray.address or os.environ.get("RAY_ADDRESS")
        if address:
            ray.init(address=address, runtime_env={"env_vars": _RUNTIME_ENV}, log_to_driver=self.verbose)
        else:
            # "local": a new cluster of its own, never one that `ray start` left running on this machine
            ray.init(address="local", num_cpus=self.cfg.ray.num_cpus, include_dashboard=self.cfg.ray.include_dashboard,
                     dashboard_host=self.cfg.ray.dashboard_host, runtime_env={"env_vars": _RUNTIME_ENV},
                     log_to_driver=self.verbose)

    def use_gpu(self, setting: str) -> bool:
        import ray

        if setting != "auto":
            return setting == "true"
        return ray.cluster_resources().get("GPU", 0) > 0

    @contextlib.contextmanager
    def stage(self, name: str):
        start = time.time()
        entry = self.manifest["stages"].setdefault(name, {})
        log.info("[grads-ray] %s ...", name)
        yield entry
        entry["seconds"] = round(time.time() - start, 2)
        log.info("[grads-ray] %s done in %.1f s", name, entry["seconds"])
        self.save_manifest()

    def save_manifest(self) -> None:
        write_json(self.out / "manifest.json", self.manifest)

    def _dir(self, name: str) -> StageDir:
        return StageDir(self.out, name)

    # ------------------------------------------------------------------------------------ ingest
    def ingest(self) -> str:
        """Plan shards, validate rows in parallel tasks, merge rejects. -> the stage's fingerprint."""
        if "ingest" in self._fps:
            return self._fps["ingest"]
        from grads_ray.data.readers import empty_inputs
        from grads_ray.ingest import drop_duplicate_ids, run_ingest

        d = self.cfg.data
        stat = [(p, os.path.getsize(p) if os.path.isfile(p) else None, os.path.getmtime(p))
                for p in d.paths if os.path.exists(p)]
        fp = fingerprint("ingest", d.paths, stat, d.shard_bytes, d.shard_rows, d.limit)
        stage = self._dir("rows")
        with self.stage("ingest") as entry:
            if not stage.prepare(fp):
                shards = plan_shards(d.paths, d.shard_bytes, d.shard_rows, d.limit)
                write_json(stage.path / "shards.json", [s.to_dict() for s in shards])
                self.ensure_ray()
                todo = [sh for sh in shards if not stage.is_done(sh.index)]
                bar = Progress("ingest", len(shards), "shards", done=len(shards) - len(todo))
                run_ingest(shards, stage, progress=bar.update)
                bar.close()
                duplicates = drop_duplicate_ids(shards, stage)
                infos = [stage.done_info(s.index) for s in shards]
                digests = {p: file_digest(p) for p in d.paths}
                empty = empty_inputs(d.paths, shards) if not d.limit else []
                if empty:
                    log.warning("[grads-ray] ingest: %d input file(s) hold no row: %s", len(empty), ", ".join(empty[:5]))
                stage.finish(fp, {"shards": len(shards), "rows": sum(i["rows"] for i in infos),
                                  "rejected": sum(i["rejected"] for i in infos), "input_sha256": digests,
                                  "duplicate_ids": duplicates, "empty_inputs": empty,
                                  "nodes": sorted({i.get("node", "") for i in infos} - {""})})
            info = stage.success_info()
            entry.update({k: info[k] for k in ("shards", "rows", "rejected", "duplicate_ids", "empty_inputs", "nodes",
                                                "computed_seconds") if k in info})
            self.manifest["inputs"] = info["input_sha256"]
        if d.strict and info["rejected"]:
            first = self._first_reject("rows")
            raise InputError(f"{first['source']}:{first['line']}: {first['reason']}"
                             f"{' (' + first['detail'] + ')' if first.get('detail') else ''} (--strict)")
        self._fps["ingest"] = fp
        return fp

    def _first_reject(self, stage_name: str) -> dict[str, Any]:
        for part in self._dir(stage_name).parts("rejected.jsonl"):
            with part.open() as fh:
                line = fh.readline()
            if line.strip():
                return json.loads(line)
        return {}

    def shards(self) -> list[Shard]:
        return [Shard(**s) for s in read_json(self._dir("rows").path / "shards.json")]

    def _tokenized(self, model_path: str, pick: dict[str, Any] | None = None):
        """Ray Data dataset of tokenized rows (with reject reasons) over the ingested corpus, or over
        the rows ``pick`` chooses (see :func:`_pick_rows`), filtered before the tokenizer runs."""
        from grads_ray.scoring import read_rows, tokenize

        d = self.cfg.data
        ds = read_rows([str(p) for p in self._dir("rows").parts()])
        if pick:
            ds = ds.map_batches(_pick_rows, batch_format="numpy", fn_kwargs=pick)
        return tokenize(ds, model_path=model_path, max_length=d.max_length, on_long=d.on_long,
                        batch_size=self.cfg.score.tokenize_batch_size,
                        trust_remote_code=self.cfg.model.trust_remote_code)

    # ------------------------------------------------------------------------------------ warmup
    def scoring_model(self) -> tuple[str, str]:
        """The checkpoint the scorers read: ``score.model`` when given, else the warm-up's when
        enabled, else the base model. -> (folder, fingerprint)."""
        if self.cfg.score.model:
            return self.cfg.score.model, _model_fingerprint(self.cfg.score.model)
        if self.cfg.warmup.enabled:
            return self.warmup()
        return self.cfg.model.path, fingerprint("model", self.cfg.model.path)

    def warmup(self) -> tuple[str, str]:
        """Short preliminary fine-tune on a seeded fraction of the corpus. -> (model folder, fingerprint)."""
        cfg = self.cfg
        up = self.ingest()
        fp = fingerprint("warmup", up, cfg.model.path, recipe(cfg.warmup), cfg.data.max_length, cfg.data.on_long, cfg.seed)
        stage = self._dir("warmup")
        model_dir = stage.path / "model"
        with self.stage("warmup") as entry:
            if not stage.prepare(fp):
                ids = read_parts(self._dir("rows").parts(), ["id"])["id"].to_pylist()
                n = int(_stable_fraction(ids, cfg.seed, cfg.warmup.fraction).sum())
                metrics = self._train("warmup", fp, cfg.model.path, model_dir, n,
                                      {"seed": cfg.seed, "fraction": cfg.warmup.fraction}, cfg.warmup)
                stage.finish(fp, {"rows": n, "metrics": metrics})
            entry.update(stage.success_info())
            entry.pop("fingerprint", None)
        return str(model_dir), fp

    def _train(self, name: str, fp: str, base: str, out_model: storage.Location, n_rows: int, keep: dict[str, Any],
               tcfg) -> dict:
        """Ray Train run ``NAME-FP``: a rerun of the same stage and config (after a crash) resumes from
        its latest checkpoint; another config starts its own run."""
        self.ensure_ray()
        from grads_ray.training.trainer import train

        if tcfg.parallel == "fsdp" and not self.use_gpu(tcfg.use_gpu):
            raise InputError(f"{name}.parallel=fsdp needs GPUs (Ray Train's FSDP runs on GPUs only): use ddp here")
        ds = self._tokenized(base, keep).map_batches(_training_columns, batch_format="numpy")
        return train(ds, n_rows, base, out_model, tcfg, name=f"{name}-{fp[:16]}",
                     storage_path=self.out / "ray_train", seed=self.cfg.seed, use_gpu=self.use_gpu(tcfg.use_gpu),
                     trust_remote_code=self.cfg.model.trust_remote_code)

    # ------------------------------------------------------------------------------------- score
    def score(self) -> str:
        """Per-example loss and gradient statistics of every ingested row. -> fingerprint."""
        if "score" in self._fps:
            return self._fps["score"]
        from grads_ray.scoring import engine_settings, run_scoring

        cfg = self.cfg
        up = self.ingest()
        model_path, model_fp = self.scoring_model()
        settings = engine_settings(cfg.score, cfg.seed)
        numbers = fingerprint("score", model_fp, cfg.data.max_length, cfg.data.on_long,
                              {k: v for k, v in settings.items() if k != "chunk_elements"})
        fp = fingerprint(up, numbers)
        stats, features = self._dir("stats"), self._dir("features")
        with self.stage("score") as entry:
            if not stats.prepare(fp):
                features.prepare(fp)
                self.ensure_ray()
                rows = {s.index: self._dir("rows").done_info(s.index) for s in self.shards()}
                expected = {i: info["rows"] for i, info in rows.items()}
                keys = {i: fingerprint(numbers, info.get("content")) for i, info in rows.items() if info.get("content")}
                cache = ShardCache(cfg.score.cache_dir or self.out / "score_cache")
                reused = self._reuse_scored(cache, keys, stats, features)
                bar = Progress("score", sum(expected.values()), "rows",
                               done=sum(n for i, n in expected.items() if stats.is_done(i)))
                t0 = time.time()
                infos = run_scoring(
                    self._dir("rows"), expected, stats, features, model_path=model_path,
                    max_length=cfg.data.max_length, on_long=cfg.data.on_long, batch_size=cfg.score.batch_size,
                    num_actors=cfg.score.num_actors, use_gpu=self.use_gpu(cfg.score.use_gpu),
                    trust_remote_code=cfg.model.trust_remote_code, settings=settings,
                    progress=bar.update, max_restarts=cfg.score.max_restarts)
                bar.close()
                for i, key in keys.items():  # every shard of this run, for the next corpus version
                    if cache.get(key) is None:
                        cache.put(key, self._scored_files(i), stats.done_info(i))
                done = [stats.done_info(s) for s in expected]
                scored = sum(i["scored"] for i in done)
                stats.finish(fp, {"scored": scored, "rejected": sum(i["rejected"] for i in done),
                                  "nodes": sorted({n for i in done for n in i.get("nodes", [])} - {""}),
                                  "truncated": sum(i.get("truncated", 0) for i in done),
                                  "nonfinite": sum(i.get("nonfinite", 0) for i in done),
                                  "model": model_path, "shards_this_run": len(infos), "shards_reused": reused,
                                  "engine": cfg.score.engine,
                                  "examples_per_s": round(sum(i["scored"] for i in infos) / max(time.time() - t0, 1e-9), 2)})
                features.finish(fp, {"scored": scored})
            info = stats.success_info()
            entry.update({k: v for k, v in info.items() if k != "fingerprint"})
            self._merge_rejects()
            self._account()
        if cfg.data.strict and info["rejected"]:
            first = self._first_reject("stats")
            raise InputError(f"{first['source']}:{first['line']}: {first['reason']} (--strict)")
        self._fps["score"] = fp
        return fp

    def _scored_files(self, shard: int) -> dict[str, storage.Location]:
        stats, features = self._dir("stats"), self._dir("features")
        return {"stats.parquet": stats.part(shard), "features.parquet": features.part(shard),
                "rejected.jsonl": stats.part(shard, "rejected.jsonl")}

    def _reuse_scored(self, cache: ShardCache, keys: dict[int, str], stats: StageDir, features: StageDir) -> int:
        """Shards whose rows and scoring were seen before (same key) take the cached files instead of
        being scored. -> how many."""
        n = 0
        for shard, key in keys.items():
            info = cache.get(key) if not stats.is_done(shard) else None
            if info is None:
                continue
            cache.restore(key, self._scored_files(shard))
            info = {**info, "shard": shard, "reused": True}
            features.mark_done(shard, info)
            stats.mark_done(shard, info)
            n += 1
        if n:
            log.info("[grads-ray] score: %d of %d shards taken from the cache %s", n, len(keys), cache.root)
        return n

    def _merge_rejects(self) -> None:
        rows: list[dict[str, Any]] = []
        for name in ("rows", "stats"):
            for part in self._dir(name).parts("rejected.jsonl"):
                rows += [json.loads(line) for line in part.read_text().splitlines() if line.strip()]
        write_jsonl(self.out / "rejected.jsonl", rows)
        self.manifest["rejected_by_reason"] = dict(Counter(r["reason"] for r in rows).most_common())

    def _account(self) -> None:
        """Every input row is exactly once in stats or rejected: checked, recorded, enforced."""
        ing = self._dir("rows").success_info()
        sc = self._dir("stats").success_info()
        acc = {"input_rows": ing["rows"] + ing["rejected"], "rejected_ingest": ing["rejected"],
               "rejected_score": sc["rejected"], "scored": sc["scored"]}
        self.manifest["accounting"] = acc
        if acc["scored"] + acc["rejected_ingest"] + acc["rejected_score"] != acc["input_rows"]:
            raise RuntimeError(f"row accounting does not add up: {acc}")

    # ------------------------------------------------------------------------------------- embed
    def embed(self) -> str:
        """Sentence-encoder vectors of every scored example (``similarity.feature: encoder``), one
        part a shard, by Ray actors (one GPU each when present); finished shards are kept."""
        if "embed" in self._fps:
            return self._fps["embed"]
        import ray
        from ray.util import ActorPool

        from grads_ray.similarity.encoder import Encoder, default_encoder_path

        s = self.cfg.similarity
        up = self.score()
        path = s.encoder_path or default_encoder_path()
        fp = fingerprint("embed", up, path, s.encoder_max_length)
        stage = self._dir("embeddings")
        with self.stage("embed") as entry:
            if not stage.prepare(fp):
                self.ensure_ray()
                use_gpu = self.use_gpu(s.use_gpu)
                todo = [sh.index for sh in self.shards() if not stage.is_done(sh.index)]
                cap = int(ray.cluster_resources().get("GPU", 1)) if use_gpu else self.cfg.score.num_actors
                actor = ray.remote(num_cpus=1, num_gpus=1 if use_gpu else 0)(Encoder)
                actors = [actor.remote(path, s.encoder_max_length, s.encoder_batch_size, use_gpu)
                          for _ in range(max(1, min(len(todo), cap)) if todo else 0)]
                jobs = [(i, str(self._dir("rows").part(i)), str(self._dir("stats").part(i)), str(stage.part(i)))
                        for i in todo]
                results = ActorPool(actors).map(lambda a, j: a.embed_part.remote(*j[1:]), jobs)
                bar = Progress("embed", len(self.shards()), "shards", done=len(self.shards()) - len(todo))
                for (i, *_), info in zip(jobs, results, strict=True):
                    stage.mark_done(i, info)
                    bar.update(1)
                bar.close()
                for a in actors:  # free their CPUs/GPUs for the index workers
                    ray.kill(a)
                infos = [stage.done_info(sh.index) for sh in self.shards()]
                stage.finish(fp, {"encoder": path, "rows": sum(i["rows"] for i in infos),
                                  "no_text": sum(i["no_text"] for i in infos), "shards_this_run": len(todo)})
            entry.update({k: v for k, v in stage.success_info().items() if k != "fingerprint"})
        self._fps["embed"] = fp
        return fp

    # -------------------------------------------------------------------------------- similarity
    def similarity(self) -> str:
        """k nearest neighbours, near-duplicate groups, diversity and k-means clusters over the
        feature vectors, streamed shard by shard into index workers (grads_ray/similarity/stream.py).
        ``nn_rows`` are positions in the id-sorted table (the select stage's order)."""
        if "similarity" in self._fps:
            return self._fps["similarity"]
        from grads_ray.similarity.index import IndexSpec
        from grads_ray.similarity.stream import (
            RayPool,
            StreamSettings,
            default_workers,
            similarity_over_parts,
        )

        s = self.cfg.similarity
        encoder = s.feature == "encoder"
        up = self.embed() if encoder else self.score()
        fp = fingerprint("similarity", up, asdict(s), self.cfg.seed)
        stage = self._dir("similarity")
        with self.stage("similarity") as entry:
            if not stage.prepare(fp):
                self.ensure_ray()
                t0 = time.time()
                use_gpu = bool(self._faiss_gpu(s.use_gpu))
                spec = IndexSpec(kind=s.index, exact_max=s.exact_max, nlist=s.nlist, nprobe=s.nprobe, pq_m=s.pq_m,
                                 train_size=s.train_size, seed=self.cfg.seed)
                st = StreamSettings(
                    column=s.feature, k=s.k, threshold=s.threshold(), spec=spec,
                    recall_sample=s.recall_sample, clusters=s.clusters,
                    center=s.centred(), memory_mb=s.memory_mb,
                    workers=s.workers or default_workers(use_gpu), use_gpu=use_gpu, seed=self.cfg.seed)
                source = self._dir("embeddings" if encoder else "features")
                n_rows = self._dir("stats").success_info()["scored"]
                bar = Progress("similarity", n_rows, "rows")
                info = similarity_over_parts(source.parts(), stage.part, st, pool_cls=RayPool, progress=bar.update)
                bar.close()
                stage.finish(fp, {**info, "feature": s.feature, "seconds": round(time.time() - t0, 2)})
            entry.update({k: v for k, v in stage.success_info().items() if k != "fingerprint"})
        self._fps["similarity"] = fp
        return fp

    def _faiss_gpu(self, setting: str) -> bool | None:
        from grads_ray.similarity.index import faiss_module, gpu_available

        if setting == "false":
            return False
        return gpu_available(faiss_module()) if setting == "auto" else True

    def _needs_similarity(self) -> bool:
        return needs_similarity(self.cfg)

    # ------------------------------------------------------------------------------------ target
    def target(self) -> str:
        """LESS's target set scored by the same model and engine as the corpus: its projected
        gradients, in ``target/part-00000.parquet``."""
        if "target" in self._fps:
            return self._fps["target"]
        import ray

        from grads_ray.scoring import engine_settings, score_examples

        cfg = self.cfg
        paths = cfg.select.less.target_paths
        up = self.score()
        model_path, _ = self.scoring_model()
        digests = [file_digest(p) if Path(p).is_file() else p for p in paths]
        fp = fingerprint("target", up, digests)
        stage = self._dir("target")
        with self.stage("target") as entry:
            if not stage.prepare(fp):
                examples, ids, bad = self._encode_files(paths, model_path, "truncate")  # as held-out rows
                if not examples:
                    raise InputError(f"select.less.target_paths: no usable example in {paths} ({bad} rejected)")
                use_gpu = self.use_gpu(cfg.score.use_gpu)
                task = ray.remote(num_cpus=1, num_gpus=1 if use_gpu else 0)(score_examples)
                got = ray.get(task.remote(model_path, examples, settings=engine_settings(cfg.score, cfg.seed),
                                          batch_size=cfg.score.batch_size, use_gpu=use_gpu,
                                          trust_remote_code=cfg.model.trust_remote_code))
                write_parquet(stage.part(0), pa.table({
                    "id": pa.array(ids, pa.string()), "loss": pa.array(got["loss"]),
                    "grad_proj": pa.array(list(got["grad_proj"].astype(np.float32)), pa.list_(pa.float32()))}))
                stage.finish(fp, {"examples": len(ids), "rejected": bad})
            entry.update({k: v for k, v in stage.success_info().items() if k != "fingerprint"})
        self._fps["target"] = fp
        return fp

    # ------------------------------------------------------------------------------------ select
    def select(self) -> str:
        """Choose the subset; write selection.parquet (every scored id, its verdict and every score
        component) and the selected rows, in rank order, as selected.jsonl and selected.parquet."""
        if "select" in self._fps:
            return self._fps["select"]
        from grads_ray.selection.budget import parse_budget
        from grads_ray.selection.select import select

        cfg, sc = self.cfg, self.cfg.select
        ups = [self.score()]
        if self._needs_similarity():
            ups.append(self.similarity())
        if sc.method == "less":
            ups.append(self.target())
        if sc.max_similarity > 0 and cfg.similarity.feature == "encoder":
            ups.append(self.embed())
        fp = fingerprint("select", *ups, asdict(sc), cfg.seed)
        stage = self._dir("select")
        with self.stage("select") as entry:
            if not stage.prepare(fp):
                t0 = time.time()
                stats = read_parts(self._dir("stats").parts(), self._select_columns())
                if stats.num_rows == 0:
                    raise InputError(f"no row of the corpus could be scored: see {self.out / 'rejected.jsonl'}")
                stats = stats.take(pc.sort_indices(stats["id"]))
                ids = stats["id"].combine_chunks()
                cols = {c: stats[c].to_numpy() for c in stats.column_names if c != "id"}
                kwargs: dict[str, Any] = {"source": self._sources(ids)}
                if self._needs_similarity():
                    sim = self._aligned(self._dir("similarity"), ids,
                                        ["id", "nn_rows", "nn_sims", "dup_group", "diversity", "cluster"])
                    kwargs["similarity"] = {"dup_group": sim["dup_group"].to_numpy(),
                                            "diversity": sim["diversity"].to_numpy(),
                                            "cluster": sim["cluster"].to_numpy(),
                                            "nn_idx": matrix(sim["nn_rows"], np.int64),
                                            "nn_sims": matrix(sim["nn_sims"])}
                if sc.method == "fisher":
                    feats = self._aligned(self._dir("features"), ids, ["id", "fisher_factor"])
                    flat = matrix(feats["fisher_factor"])
                    kwargs["fisher_factors"] = flat.reshape(len(flat), *_factor_shape(flat.shape[1], cfg.score))
                    kwargs["device"] = "cuda" if self._torch_gpu(sc.fisher.use_gpu) else "cpu"
                if sc.max_similarity > 0 and sc.method != "fisher":
                    from grads_ray.similarity.index import unit_vectors

                    s = cfg.similarity
                    src = self._dir("embeddings" if s.feature == "encoder" else "features")
                    kwargs["vectors"] = unit_vectors(matrix(self._aligned(src, ids, ["id", s.feature])[s.feature]),
                                                     center=s.centred())
                if sc.method == "less":
                    kwargs["grad_proj"] = matrix(self._aligned(self._dir("features"), ids,
                                                                ["id", "grad_proj"])["grad_proj"])
                    kwargs["target_proj"] = matrix(read_parts(self._dir("target").parts())["grad_proj"])
                try:
                    res = select(cols, ids, parse_budget(sc.budget), sc, cfg.seed, **kwargs)
                except ValueError as exc:  # a setting that does not fit this corpus: say which
                    raise InputError(f"select: {exc}") from None
                select_s = time.time() - t0
                table = pa.table({"id": ids, **{k: pa.array(v) for k, v in res.items()}})
                write_parquet(self.out / "selection.parquet", table)
                self._report(cols, ids, res, kwargs.get("similarity"))
                chosen = table.filter(table["selected"])
                chosen = chosen.take(pc.sort_indices(chosen["rank"]))
                self._write_selected(chosen["id"].to_pylist())
                n_tok = int(cols["n_tokens"][res["selected"]].sum())
                stage.finish(fp, {"method": sc.method, "budget": sc.budget, "scored": len(res["selected"]),
                                  "selected": int(res["selected"].sum()), "selected_tokens": n_tok,
                                  "total_tokens": int(cols["n_tokens"].sum()), "select_seconds": round(select_s, 2),
                                  "not_selected_by_reason": dict(Counter(r for r in res["reason"] if r)),
                                  "selected_by_source": _count_by(kwargs["source"], res["selected"])})
            entry.update({k: v for k, v in stage.success_info().items() if k != "fingerprint"})
        self._fps["select"] = fp
        return fp

    def _report(self, cols: dict[str, np.ndarray], ids: pa.Array, res: dict[str, np.ndarray],
                similarity: dict[str, np.ndarray] | None) -> None:
        """OUT/selection_report.md: counts, gradient-statistic distributions (all, selected, removed
        as near-duplicates) and examples of the removed."""
        from grads_ray.evaluation.report import write_report

        stats = dict(self.manifest.get("stages", {}))
        stats["select"] = {"method": self.cfg.select.method, "budget": self.cfg.select.budget}
        write_report(self.out, cols, ids, res["selected"], res["reason"],
                     (similarity or {}).get("dup_group"), {**self.manifest, "stages": stats})

    def _select_columns(self) -> list[str]:
        """The stats columns the configured method reads (a 10^7-row table with every layer group's
        statistics would not fit in the driver's memory whole)."""
        parts = self._dir("stats").parts()
        if not parts:
            return ["id", "loss", "n_tokens"]
        names = list(dict.fromkeys(c for p in parts for c in pq.read_schema(str(p)).names))  # an empty shard has fewer
        sc, g = self.cfg.select, self.cfg.select.grads
        want = {"id", "loss", "n_tokens", "finite", "loss_response_only", sc.baseline.grad_norm_column}
        if sc.method == "grads":
            want |= {f"{grp}.{st}" for grp in g.groups for st in g.stats} | set(g.stats)
        return [c for c in names if c in want]

    def _torch_gpu(self, setting: str) -> bool:
        import torch

        return setting == "true" or (setting == "auto" and torch.cuda.is_available())

    def _aligned(self, stage: StageDir, ids: pa.Array, columns: list[str]) -> pa.Table:
        """A stage's table sorted by id, checked to hold exactly the scored ids."""
        t = read_parts(stage.parts(), columns)
        t = t.take(pc.sort_indices(t["id"]))
        if t.num_rows != len(ids) or not t["id"].combine_chunks().equals(ids):
            raise RuntimeError(f"{stage.path.name} and the stats table hold different ids: rerun with a fresh output")
        return t

    def _sources(self, ids: pa.Array) -> pa.Array:
        """Each scored id's source (its input file, relative to the path given), as Arrow strings."""
        rows = read_parts(self._dir("rows").parts(), ["id", "source"])
        pos = pc.index_in(ids, value_set=rows["id"].combine_chunks())
        return rows["source"].combine_chunks().take(pos)

    def _write_selected(self, ranked_ids: list[str]) -> None:
        """The original rows of the selected ids, in rank order: selected.jsonl (one JSON record a
        line, as read) and selected.parquet (id, rank, record)."""
        want = {i: r for r, i in enumerate(ranked_ids)}
        records: list[str | None] = [None] * len(ranked_ids)
        for part in self._dir("rows").parts():
            t = pq.read_table(str(part), columns=["id", "record"])
            mask = pc.is_in(t["id"], value_set=pa.array(ranked_ids, pa.string()))
            for i, rec in zip(*[t.filter(mask)[c].to_pylist() for c in ("id", "record")], strict=True):
                records[want[i]] = rec
        missing = [i for i, r in zip(ranked_ids, records, strict=True) if r is None]
        if missing:
            raise RuntimeError(f"{len(missing)} selected ids have no ingested row (first: {missing[0]!r})")
        write_text(self.out / "selected.jsonl", "".join(r + "\n" for r in records))
        write_parquet(self.out / "selected.parquet", pa.table({
            "id": pa.array(ranked_ids, pa.string()), "rank": pa.array(np.arange(len(records), dtype=np.int64)),
            "record": pa.array(records, pa.string())}))

    # ---------------------------------------------------------------------------------- finetune
    def finetune(self) -> tuple[str, str]:
        """Fine-tune the base model on the selected rows. -> (model folder, fingerprint)."""
        import ray

        cfg = self.cfg
        up = self.select()
        fp = fingerprint("finetune", up, cfg.model.path, recipe(cfg.finetune), cfg.seed)
        stage = self._dir("finetune")
        model_dir = stage.path / "model"
        with self.stage("finetune") as entry:
            if not stage.prepare(fp):
                sel = pq.read_table(str(self.out / "selection.parquet"), columns=["id", "selected"])
                ids = set(sel.filter(sel["selected"])["id"].to_pylist())
                self.ensure_ray()
                metrics = self._train("finetune", fp, cfg.model.path, model_dir, len(ids),
                                      {"ids": ray.put(ids)}, cfg.finetune)
                stage.finish(fp, {"rows": len(ids), "metrics": metrics})
            entry.update({k: v for k, v in stage.success_info().items() if k != "fingerprint"})
        return str(model_dir), fp

    # ---------------------------------------------------------------------------------- evaluate
    def evaluate(self) -> dict[str, Any]:
        """Domain and general loss of the base and the fine-tuned model, and their relative change.
        The base model's side is the ``baseline`` stage, computed beside the fine-tuned model's
        when it is not found finished (compare computes it once and links it into every run)."""
        import ray

        from grads_ray.evaluation.metrics import forgetting

        e = self.cfg.eval
        tuned, up = self.finetune()
        fp = fingerprint("evaluate", up, asdict(e))
        stage = self._dir("evaluate")
        with self.stage("evaluate") as entry:
            if not stage.prepare(fp):
                task, args, held_rejects = self._evaluation()
                after_ref = task.remote(tuned, *args)
                before = self.baseline((task, args, held_rejects))
                after = ray.get(after_ref)
                result = {"before": before, "after": after, **forgetting(before, after),
                          "heldout_examples": len(args[0]), "heldout_rejected": held_rejects}
                write_json(self.out / "eval.json", result)
                stage.finish(fp, result)
            entry.update({k: v for k, v in stage.success_info().items() if k != "fingerprint"})
        return read_json(self.out / "eval.json")

    def baseline(self, evaluation: tuple | None = None) -> dict[str, Any]:
        """The base model's domain and general metrics (every evaluation's "before"). It depends on
        the base model, the eval settings and the held-out files only, not on the seed or the
        selection. -> the metrics. ``evaluation``: ``_evaluation()``'s result, when the caller has it."""
        import ray

        cfg, e = self.cfg, self.cfg.eval
        fp = fingerprint("baseline", cfg.model.path, asdict(e), cfg.data.max_length)
        stage = self._dir("baseline")
        with self.stage("baseline") as entry:
            if not stage.prepare(fp):
                task, args, held_rejects = evaluation or self._evaluation()
                before = ray.get(task.remote(cfg.model.path, *args))
                stage.finish(fp, {"before": before, "heldout_examples": len(args[0]),
                                  "heldout_rejected": held_rejects})
            info = stage.success_info()
            entry.update({k: v for k, v in info.items() if k not in ("fingerprint", "before")})
        return info["before"]

    def _evaluation(self) -> tuple[Any, tuple, int]:
        """-> (the evaluating Ray task, its arguments after the model path, held-out rows rejected)."""
        import ray

        from grads_ray.evaluation.metrics import evaluate_model

        cfg, e = self.cfg, self.cfg.eval
        self.ensure_ray()
        domain, held_rejects = self._heldout(cfg.model.path)
        general = "\n\n".join(Path(p).read_text(errors="replace") for p in e.general_paths) or None
        use_gpu = self.use_gpu(cfg.finetune.use_gpu)
        task = ray.remote(num_cpus=1, num_gpus=1 if use_gpu else 0)(evaluate_model)
        return task, (domain, general, e.block_size, e.max_general_blocks, e.batch_size, use_gpu, e.generate,
                      e.max_new_tokens), held_rejects

    def _heldout(self, model_path: str) -> tuple[list[tuple[list[int], list[int]]], int]:
        examples, _, bad = self._encode_files(self.cfg.eval.domain_paths, model_path, "truncate")
        return examples, bad

    def _encode_files(self, paths: list[str], model_path: str, on_long: str
                      ) -> tuple[list[tuple[list[int], list[int]]], list[str], int]:
        """Small side files (held-out, target) read and tokenized in the driver.
        -> ([(input_ids, labels)], their ids, rows rejected)."""
        from grads_ray.data.formats import RowError, normalize, row_id
        from grads_ray.data.readers import read_shard
        from grads_ray.data.tokenize import encode, load_tokenizer

        if not paths:
            return [], [], 0
        tok = load_tokenizer(model_path, self.cfg.model.trust_remote_code)
        out, ids, bad = [], [], 0
        for shard in plan_shards(paths, 1 << 40, 1 << 40):
            for raw in read_shard(shard):
                try:
                    if raw.error:
                        raise raw.error
                    out.append(encode(normalize(raw.record), tok, self.cfg.data.max_length, on_long))
                    ids.append(row_id(raw.record, f"{raw.source}:{raw.line}"))
                except RowError:
                    bad += 1
        return out, ids, bad

    # ----------------------------------------------------------------------------------- run all
    def run_all(self) -> dict[str, Any]:
        start = time.time()
        self.ensure_ray()
        self.ingest()
        self.score()
        if self._needs_similarity():
            self.similarity()
        self.select()
        result = self.evaluate() if self.cfg.finetune.enabled else {}
        self.manifest["total_seconds"] = round(time.time() - start, 2)
        self.save_manifest()
        return result


def plan(cfg: Config) -> str:
    """What ``run`` would do, without starting Ray or writing outputs (``--dry-run``): inputs and
    shards, the stages in order and whether each has a finished output, the workers and resources,
    the method and budget."""
    import torch

    d, sc = cfg.data, cfg.select
    shards = plan_shards(d.paths, d.shard_bytes, d.shard_rows, d.limit)
    by_source = Counter(s.source for s in shards)
    out = storage.location(cfg.output)
    gpus = torch.cuda.device_count()
    needs_sim = needs_similarity(cfg)
    stages = [("ingest", "rows"), ("warmup", "warmup") if cfg.warmup.enabled else None, ("score", "stats"),
              ("embed", "embeddings") if needs_sim and cfg.similarity.feature == "encoder" else None,
              ("similarity", "similarity") if needs_sim else None,
              ("target", "target") if sc.method == "less" else None, ("select", "select"),
              ("finetune", "finetune") if cfg.finetune.enabled else None,
              ("baseline", "baseline") if cfg.finetune.enabled else None,
              ("evaluate", "evaluate") if cfg.finetune.enabled else None]

    def state(folder: str) -> str:
        if (out / folder / "_SUCCESS.json").exists():
            return "finished before (skipped if its inputs and config are unchanged)"
        done = len(list((out / folder / "_done").glob("*.json"))) if (out / folder / "_done").is_dir() else 0
        return f"to run ({done} shards finished before)" if done else "to run"

    lines = [f"grads-ray plan (dry run): nothing is started or written under {out}",
             f"  model           {cfg.model.path}",
             f"  inputs          {len(by_source)} files, {len(shards)} shards"
             + (f" (first {d.limit} rows)" if d.limit else "")]
    lines += [f"    {src}: {n} shard{'s' if n > 1 else ''}" for src, n in list(by_source.items())[:10]]
    if len(by_source) > 10:
        lines.append(f"    ... and {len(by_source) - 10} more files")
    lines.append("  stages")
    lines += [f"    {name:<11} {state(folder)}" for name, folder in filter(None, stages)]
    where = cfg.ray.address or os.environ.get("RAY_ADDRESS") or "a local Ray cluster started by the job"
    lines += [f"  ray             {where}; this machine: {os.cpu_count()} CPUs, {gpus} GPUs",
              f"  score           {cfg.score.num_actors} actor(s), use_gpu={cfg.score.use_gpu}, batch {cfg.score.batch_size}",
              f"  train           warm-up {cfg.warmup.fraction:.0%} x {cfg.warmup.epochs} epoch(s), fine-tune "
              f"{cfg.finetune.epochs} epoch(s); {cfg.finetune.num_workers} worker(s), {cfg.finetune.parallel}"
              + (f", LoRA r={cfg.finetune.lora.r}" if cfg.finetune.lora.r else ""),
              f"  similarity      {cfg.similarity.feature}, k={cfg.similarity.k}, index {cfg.similarity.index}, "
              f"duplicates at cosine >= {cfg.similarity.threshold()}" if needs_sim else "  similarity      not needed",
              f"  select          {sc.method}, budget {sc.budget}"]
    return "\n".join(lines)


def summary(run: Run) -> str:
    """A short human summary of what the run directory holds."""
    m = run.manifest
    st = m.get("stages", {})
    lines = [f"grads-ray: output in {run.out}"]
    acc = m.get("accounting")
    if acc:
        reasons = ", ".join(f"{k} {v}" for k, v in m.get("rejected_by_reason", {}).items()) or "none"
        lines.append(f"  input rows      {acc['input_rows']}  (rejected {acc['rejected_ingest'] + acc['rejected_score']}: {reasons})")
        sc = st.get("score", {})
        flags = ", ".join(f"{sc[k]} {label}" for k, label in (("truncated", "truncated to max_length"),
                                                              ("nonfinite", "not finite, never selected"))
                          if sc.get(k))
        lines.append(f"  scored          {acc['scored']}  ({sc.get('examples_per_s', '?')} examples/s"
                     + (f"; {flags}" if flags else "") + ")")
        if st.get("ingest", {}).get("empty_inputs"):
            lines.append(f"  empty inputs    {', '.join(st['ingest']['empty_inputs'][:5])}")
    if "similarity" in st:
        s = st["similarity"]
        lines.append(f"  near-duplicates {s.get('rows_in_dup_groups', 0)} rows in {s.get('dup_groups', 0)} groups ({s.get('index')})")
    if "select" in st:
        s = st["select"]
        frac = s["selected"] / max(s["scored"], 1)
        lines.append(f"  selected        {s['selected']} of {s['scored']} ({frac:.1%}; {s['selected_tokens']} of "
                     f"{s['total_tokens']} tokens) by {s['method']}, budget {s['budget']}")
    ev = st.get("evaluate")
    if ev:
        b, a = ev["before"], ev["after"]
        for key, label in (("domain_loss", "domain loss "), ("general_loss", "general loss")):
            if key in b and key in a:
                lines.append(f"  {label}    {b[key]:.4f} -> {a[key]:.4f}  ({ev.get(key + '_rel_change', 0):+.1%})")
        if "bleu" in b and "bleu" in a:
            lines.append("  generation      " + ", ".join(f"{k} {b[k]:.1f} -> {a[k]:.1f}" for k in ("bleu", "chrf", "rougeL"))
                         + f" ({a['generated_examples']} held-out prompts)")
    timing = ", ".join(f"{k} {v['seconds']:.0f}s" for k, v in st.items() if "seconds" in v)
    lines.append(f"  stage times     {timing}")
    if (run.out / "selected.jsonl").exists():
        lines.append(f"  selected subset {run.out / 'selected.jsonl'}")
    return "\n".join(lines)
