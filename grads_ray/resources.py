"""Ray start-up and what the cluster offers, worked out once a run and handed to the stages.

A run starts Ray only when a stage has work to do (a rerun that finds every stage finished starts
none). :class:`Resources` answers the questions stages ask of the hardware — how many CPUs each node
has, whether GPUs are there for Ray tasks, for torch in the driver, for FAISS — each in one place.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from functools import cached_property

from grads_ray.config import RayConfig
from grads_ray.determinism import CUBLAS_WORKSPACE

RUNTIME_ENV = {"HF_HUB_OFFLINE": "1", "TRANSFORMERS_VERBOSITY": "error", "TOKENIZERS_PARALLELISM": "false",
               "HF_DATASETS_OFFLINE": "1",
               "CUBLAS_WORKSPACE_CONFIG": CUBLAS_WORKSPACE}  # before a worker's first cuBLAS call (grads_ray/determinism.py)


def start_ray(rc: RayConfig, verbose: bool = False, hub_models: bool = False) -> bool:
    """Connect to ``ray.address`` (else ``RAY_ADDRESS``), or start a local cluster of our own — never
    one that ``ray start`` left running on this machine. Ray Data keeps row order (a seed then fixes
    the warm-up and everything downstream) and prints no bars of its own (grads_ray/progress.py does).
    Workers run offline (``HF_HUB_OFFLINE=1``) unless the run names Hub models (``hub_models``) and
    the user has not asked for offline; the user's Hub settings (token, cache) are passed on.
    -> whether this call started or connected (False: Ray was up already)."""
    import ray

    started = not ray.is_initialized()
    if started:
        from grads_ray import hub

        env = {**RUNTIME_ENV, **hub.worker_env()}
        if hub_models and not hub.offline():  # each node fetches the pinned Hub models it loads
            env["HF_HUB_OFFLINE"] = "0"
        os.environ.update(env)
        address = rc.address or os.environ.get("RAY_ADDRESS")
        if address:
            ray.init(address=address, runtime_env={"env_vars": env}, log_to_driver=verbose)
        else:
            ray.init(address="local", num_cpus=rc.num_cpus, include_dashboard=rc.include_dashboard,
                     dashboard_host=rc.dashboard_host, runtime_env={"env_vars": env},
                     log_to_driver=verbose)
    ctx = ray.data.DataContext.get_current()
    ctx.enable_progress_bars = False
    ctx.print_on_execution_start = False
    ctx.execution_options.preserve_order = True
    return started


def cpus_settled(timeout_s: float = 5.0) -> bool:
    """Wait (at most ``timeout_s``) until Ray's view of free CPUs shows one. The view lags the
    cluster by up to a second: just after Ray starts it has no CPU entry yet, and just after a pass
    that used every CPU it still counts them busy. A Ray Data pass started in that window warns that
    it "will hang", which it will not. -> whether a free CPU showed in time."""
    import time

    import ray

    end = time.monotonic() + timeout_s
    while not ray.available_resources().get("CPU"):
        if time.monotonic() > end:
            return False
        time.sleep(0.05)
    return True


def node_id() -> str:
    """The Ray node this process runs on ("" outside Ray): ledgers record where each shard ran."""
    import ray

    return ray.get_runtime_context().get_node_id() if ray.is_initialized() else ""


def node_cpus() -> list[int]:
    """CPUs of each alive node of the connected Ray cluster (nodes without CPUs left out; [1] when
    none has any): training and index workers size their CPU reservations from it."""
    import ray

    cpus = [int(nd["Resources"].get("CPU", 0)) for nd in ray.nodes() if nd["Alive"]]
    return [c for c in cpus if c > 0] or [1]


class Resources:
    """The connected cluster's CPUs and GPUs, read once, on first use (which starts Ray).

    ``node_cpus``: CPUs per node; ``cpus``/``gpus``: the cluster's totals. The three GPU questions
    differ on purpose: Ray tasks and actors (:meth:`gpu`) run wherever the cluster has GPUs; the
    FisherSFT greedy runs in the driver (:meth:`torch_gpu`, no Ray needed); the index workers need a
    FAISS GPU build (:meth:`faiss_gpu`). Each takes a config setting: ``true``, ``false`` or ``auto``
    (use them when present).
    """

    def __init__(self, start: Callable[[], None] = lambda: None):
        self._start = start  # makes sure Ray is up before the cluster is asked

    @cached_property
    def _cluster(self) -> tuple[list[int], float, float]:
        import ray

        self._start()
        total = ray.cluster_resources()
        return node_cpus(), total.get("CPU", 1), total.get("GPU", 0)

    @property
    def node_cpus(self) -> list[int]:
        return self._cluster[0]

    @property
    def cpus(self) -> float:
        return self._cluster[1]

    @property
    def gpus(self) -> float:
        return self._cluster[2]

    def gpu(self, setting: str) -> bool:
        """Whether Ray work asked for with ``setting`` takes a GPU."""
        return setting == "true" or (setting == "auto" and self.gpus > 0)

    def torch_gpu(self, setting: str) -> bool:
        """Whether work in the driver process runs on CUDA."""
        return setting == "true" or (setting == "auto" and self._driver_cuda)

    def faiss_gpu(self, setting: str) -> bool:
        """Whether the similarity index workers are given GPUs: asked (``true``), or by default where
        the cluster has GPUs and FAISS can use them as far as the driver can tell (each worker checks
        again on its own GPU and falls back to the CPU, saying so: ``faiss_gpu_problem``)."""
        return setting == "true" or (setting == "auto" and self.gpus > 0 and self._faiss_gpus)

    @property
    def faiss_gpu_problem(self) -> str | None:
        """Why the driver's FAISS cannot search on its GPU (None: it can, or it has no GPU to try)."""
        from grads_ray.similarity.index import faiss_module, gpu_problem, sees_gpu

        faiss = faiss_module()
        return gpu_problem(faiss) if sees_gpu(faiss) else None

    @cached_property
    def _driver_cuda(self) -> bool:
        import torch

        return torch.cuda.is_available()

    @cached_property
    def _faiss_gpus(self) -> bool:
        """A FAISS GPU build that searches on the driver's GPU, or, where the driver has none (a head
        node without GPUs), that the workers' GPUs may run (they check)."""
        from grads_ray.similarity.index import faiss_module, gpu_problem, sees_gpu

        faiss = faiss_module()
        if not hasattr(faiss, "StandardGpuResources"):
            return False
        return not sees_gpu(faiss) or gpu_problem(faiss) is None
