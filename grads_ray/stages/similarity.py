"""embed and similarity: the feature vectors' neighbourhoods, near-duplicates and clusters.

embed (``similarity.feature=encoder``): every scored example's text through a sentence encoder, one
part a shard, by Ray actors (a GPU each when present); finished shards are kept.
similarity: k nearest neighbours, near-duplicate groups, diversity and k-means clusters over the
feature vectors (``hidden_mean`` or ``grad_proj`` from the score stage's features, or the encoder's),
streamed shard by shard into index workers (grads_ray/similarity/stream.py). ``nn_rows`` are
positions in the id-sorted table (the select stage's order).
"""

from __future__ import annotations

import functools
import time
from dataclasses import asdict
from typing import Any

from grads_ray.progress import Progress
from grads_ray.stages.base import Outputs, Stage


class Embed(Stage):
    name, folders = "embed", ("embeddings",)
    about = "sentence-encoder vectors (similarity.feature=encoder): embeddings/"

    def needs(self, cfg) -> list[str]:
        return ["ingest", "score"]

    def settings(self, cfg) -> tuple:
        from grads_ray.similarity.encoder import default_encoder_path

        s = cfg.similarity
        return s.encoder_path or default_encoder_path(), s.encoder_max_length

    def run(self, ctx, out: Outputs) -> dict[str, Any]:
        import ray
        from ray.util.queue import Queue

        from grads_ray.similarity.encoder import Encoder, default_encoder_path

        s, res = ctx.cfg.similarity, ctx.ray()
        corpus, stats, stage = ctx.need("ingest").value, ctx.need("score")["stats"], out["embeddings"]
        path = s.encoder_path or default_encoder_path()
        use_gpu = res.gpu(s.use_gpu)
        todo = [sh.index for sh in corpus.shards if not stage.is_done(sh.index)]
        cap = int(res.gpus or 1) if use_gpu else ctx.cfg.score.num_actors
        actor = ray.remote(num_cpus=1, num_gpus=1 if use_gpu else 0)(Encoder)
        actors = [actor.remote(path, s.encoder_max_length, s.encoder_batch_size, use_gpu)
                  for _ in range(max(1, min(len(todo), cap)) if todo else 0)]
        scored = {sh.index: stats.done_info(sh.index)["scored"] for sh in corpus.shards}
        bar = Progress("embed", sum(scored.values()), "rows", done=sum(scored[i] for i in scored if i not in todo))
        # each actor puts the rows it has encoded (no CPU of its own: the encoders may hold them all)
        rows_done = Queue(actor_options={"num_cpus": 0}) if todo else None
        jobs = [(i, str(corpus.rows.part(i)), str(stats.part(i)), str(stage.part(i))) for i in todo]
        idle, running = list(actors), {}
        try:
            while jobs or running:
                while idle and jobs:  # each actor one shard at a time, the next as soon as it is free
                    a, (i, *paths) = idle.pop(), jobs.pop(0)
                    running[a.embed_part.remote(*paths, progress=rows_done)] = (a, i)
                ready, _ = ray.wait(list(running), num_returns=1, timeout=1.0)
                while rows_done.qsize():
                    bar.update(rows_done.get())
                for ref in ready:
                    a, i = running.pop(ref)
                    stage.mark_done(i, ray.get(ref))
                    idle.append(a)
        finally:
            bar.close()
            if rows_done is not None:
                rows_done.shutdown()
            for a in actors:  # free their CPUs/GPUs for the index workers
                ray.kill(a)
        infos = [stage.done_info(sh.index) for sh in corpus.shards]
        return {"encoder": path, "rows": sum(i["rows"] for i in infos), "no_text": sum(i["no_text"] for i in infos),
                "shards_this_run": len(todo)}


class Similarity(Stage):
    name, folders = "similarity", ("similarity",)
    about = "neighbours, near-duplicate groups and clusters: similarity/"

    def needs(self, cfg) -> list[str]:
        return ["score", "embed"] if cfg.similarity.feature == "encoder" else ["score"]

    def settings(self, cfg) -> tuple:
        return asdict(cfg.similarity), cfg.seed

    def run(self, ctx, out: Outputs) -> dict[str, Any]:
        from grads_ray.similarity.index import IndexSpec
        from grads_ray.similarity.stream import RayPool, StreamSettings, similarity_over_parts

        cfg, res = ctx.cfg, ctx.ray()
        s = cfg.similarity
        t0 = time.time()
        use_gpu = res.faiss_gpu(s.use_gpu)
        workers = s.workers or (max(1, int(res.gpus)) if use_gpu else 1)  # auto: one per GPU, else one
        spec = IndexSpec(kind=s.index, exact_max=s.exact_max, nlist=s.nlist, nprobe=s.nprobe, pq_m=s.pq_m,
                         train_size=s.train_size, seed=cfg.seed)
        st = StreamSettings(column=s.feature, k=s.k, threshold=s.threshold(), spec=spec,
                            recall_sample=s.recall_sample, clusters=s.clusters, center=s.centred(),
                            memory_mb=s.memory_mb, workers=workers, use_gpu=use_gpu,
                            seed=cfg.seed)
        score = ctx.need("score")
        source = ctx.need("embed")["embeddings"] if s.feature == "encoder" else score["features"]
        bar = Progress("similarity", score.info["scored"], "rows")
        st, progress = _test_hooks(st, bar.update)
        info = similarity_over_parts(source.parts(), out["similarity"].part, st, progress=progress,
                                     pool_cls=functools.partial(RayPool, node_cpus=res.node_cpus))
        bar.close()
        if s.use_gpu != "false" and res.gpus > 0 and not use_gpu and res.faiss_gpu_problem:
            info["faiss_gpu_fallback"] = res.faiss_gpu_problem  # GPUs there, FAISS unable: the CPU index
        return {**info, "feature": s.feature, "seconds": round(time.time() - t0, 2)}


TEST_HOOKS_ENV = "GRADS_RAY_TEST_SIMILARITY_HOOKS"


def _test_hooks(st, progress):
    """For the tests (JSON in ``GRADS_RAY_TEST_SIMILARITY_HOOKS``): ``chunk_rows`` per chunk and
    ``sleep`` seconds after each chunk is written, so a small corpus gives a stage long enough to stop
    in the middle. -> (settings, progress callback), unchanged when the variable is unset."""
    import dataclasses
    import json
    import os

    hooks = json.loads(os.environ.get(TEST_HOOKS_ENV) or "{}")
    if not hooks:
        return st, progress

    def slowed(rows: int) -> None:
        progress(rows)
        time.sleep(hooks.get("sleep", 0))

    return dataclasses.replace(st, chunk_rows=hooks.get("chunk_rows", st.chunk_rows)), slowed
