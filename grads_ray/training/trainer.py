"""Ray Train plumbing: a ``TorchTrainer`` over a Ray Data dataset of tokenized rows -> an HF folder."""

from __future__ import annotations

import shutil
import threading
from typing import Any

from grads_ray import storage
from grads_ray.config import ConfigError, TrainConfig
from grads_ray.determinism import explain
from grads_ray.storage import Location


def train(dataset, n_rows: int, model_path: str, out_model: Location, cfg: TrainConfig, *, name: str,
          storage_path: Location, seed: int, use_gpu: bool, nodes: list[int] | None = None,
          trust_remote_code: bool = False, fail_at_step: int | None = None,
          threads: int | None = None, deterministic: bool = True) -> dict[str, Any]:
    """Fine-tune ``model_path`` on ``dataset`` (columns input_ids, labels) and save to ``out_model``
    (a local folder or an object-store URL, as is ``storage_path``, Ray Train's checkpoints).

    ``name``: ``STAGE-...``, the Ray Train run (its stage names the config keys in errors);
    ``nodes``: CPUs per node (default: the connected cluster's), which size CPU workers' threads
    unless ``threads`` says; ``fail_at_step``: tests of resumption.
    -> the final metrics (train loss of the first and last step, steps, tokens/s, the step a restart
    resumed from). A failed worker group restarts (``FailureConfig``, twice) from the latest
    checkpoint (``cfg.checkpoint_every``).
    """
    import ray.train
    from ray.train.torch import TorchTrainer
    from ray.util.queue import Queue

    from grads_ray.resources import node_cpus
    from grads_ray.training.recipe import LoopSettings, optimizer_steps, train_loop_per_worker

    stage = name.split("-")[0]
    if cfg.parallel == "fsdp" and not use_gpu:
        raise ConfigError(f"{stage}.parallel=fsdp needs GPUs (Ray Train's FSDP runs on GPUs only): use ddp here")
    cpus = None if use_gpu else worker_cpus(cfg.cpus_per_worker, cfg.num_workers, nodes or node_cpus(), stage)
    steps = Queue(maxsize=1000, actor_options={"num_cpus": 0})  # rank 0 puts its step, every few seconds
    settings = LoopSettings(train=cfg, model_path=model_path, n_rows=n_rows, seed=seed, threads=threads or cpus,
                            trust_remote_code=trust_remote_code, progress=steps, fail_at_step=fail_at_step,
                            deterministic=deterministic)
    trainer = TorchTrainer(
        train_loop_per_worker,
        train_loop_config={"settings": settings},
        scaling_config=ray.train.ScalingConfig(num_workers=cfg.num_workers, use_gpu=use_gpu,
                                               resources_per_worker=None if cpus is None else {"CPU": cpus}),
        run_config=ray.train.RunConfig(name=name, storage_path=str(storage_path),
                                       failure_config=ray.train.FailureConfig(max_failures=2)),
        datasets={"train": dataset},
    )
    _, total = optimizer_steps(n_rows, cfg.batch_size, cfg.num_workers, cfg.grad_accum, cfg.epochs, cfg.max_steps)
    stop = threading.Event()
    watcher = threading.Thread(target=_show_steps, args=(steps, stage, total, stop), daemon=True)
    watcher.start()
    try:
        result = trainer.fit()
    except Exception as exc:
        line = explain(exc)  # an op with no deterministic kernel in the loop: one line, not Ray's traceback
        if line:
            raise ConfigError(f"{stage}: {line}") from None
        raise
    finally:
        stop.set()
        watcher.join(timeout=5)
        steps.shutdown()
    if result.checkpoint is None:
        raise RuntimeError(f"{name}: training finished without a checkpoint")
    # beside the target when local (the rename is then one step), in a local temporary folder when
    # the run directory is in an object store (then uploaded)
    near = None if storage.is_remote(out_model) else out_model.parent
    if near is not None:
        near.mkdir(parents=True, exist_ok=True)
    tmp = storage.make_temp_dir(f".{out_model.name}.", near)
    try:
        result.checkpoint.to_directory(str(tmp))
        storage.upload_dir(tmp, out_model)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return dict(result.metrics or {})


def worker_cpus(asked: int, workers: int, nodes: list[int], stage: str) -> int:
    """CPUs (= torch threads) for each CPU training worker. ``asked`` 0: the smallest node's CPUs
    shared among the workers one node would hold, less one left for Ray Data's ingest tasks
    (2 CPUs, 1 worker -> 1; 16 CPUs, 1 worker -> 15; 16 CPUs, 2 workers on 2 nodes -> 15). A number
    that no node holds, or that leaves Ray Data no CPU, is refused here: Ray Train would wait forever."""
    per_node = -(-workers // len(nodes))
    if asked == 0:
        return max(1, min(nodes) // per_node - 1)
    if asked * per_node > max(nodes):
        raise ConfigError(f"{stage}.cpus_per_worker={asked}: {per_node} worker(s) a node need "
                          f"{asked * per_node} CPUs, and the largest node has {max(nodes)}")
    if asked * workers >= sum(nodes):
        raise ConfigError(f"{stage}.cpus_per_worker={asked}: {workers} worker(s) would hold all {sum(nodes)} "
                          "CPUs of the cluster and leave none for Ray Data's ingest (use fewer, or 0: auto)")
    return asked


def _show_steps(steps, stage: str, total: int, stop: threading.Event) -> None:
    """Driver thread: the optimizer steps rank 0 reports -> progress (steps done / total, rate, ETA)."""
    from grads_ray.progress import Progress

    bar, seen = Progress(stage, total, "steps"), 0
    while not stop.is_set():
        try:
            step = steps.get(timeout=1)
        except Exception:  # noqa: BLE001 - empty (timeout) or the queue gone at the end
            continue
        if step > seen:
            bar.update(step - seen)
            seen = step
    bar.close()
