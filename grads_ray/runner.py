"""The runner: one run directory, the stages of grads_ray/stages/ over it, and the manifest.

For every stage the same loop (:meth:`Runner.need`): fingerprint (its settings and its inputs'
fingerprints, which resolves the inputs first), then either a memo hit (``.ledger/SUCCESS.json`` holds this
fingerprint, and every file it declares is there: nothing recomputed) or prepare → run → finish,
then the manifest entries (the stage's and its :meth:`Stage.report`) and the stage's checks. A stage
sees the run through its :class:`StageContext`: another's outputs only for the names its ``needs``
lists, so what ``--dry-run`` plans (the same table) is what a run executes.
``manifest.json`` records config, versions, per-stage counts and timings, and input hashes.
"""

from __future__ import annotations

import contextlib
import logging
import os
import platform
import time
from importlib import metadata
from typing import Any

import yaml

from grads_ray import stopping, storage
from grads_ray.config import Config, absolute_paths, path_settings
from grads_ray.resources import Resources, start_ray
from grads_ray.rundir import StageDir, fingerprint, read_json, unify_parts, write_json, write_text
from grads_ray.stages import STAGES, Done, Outputs, Stage, job_end
from grads_ray.stages.base import StageContext

log = logging.getLogger("grads_ray")


def versions() -> dict[str, str]:
    """Python's and the main packages' versions, for the manifest."""
    out = {"python": platform.python_version()}
    for pkg in ("grads-ray", "torch", "ray", "transformers", "tokenizers", "datasets", "pyarrow", "numpy",
                "faiss-cpu", "faiss-gpu", "faiss-gpu-cu12"):
        with contextlib.suppress(metadata.PackageNotFoundError):
            out[pkg] = metadata.version(pkg)
    return out


def driver_memory_pool() -> None:
    """Arrow allocates through the C library's malloc in the driver (unless ARROW_DEFAULT_MEMORY_POOL
    says otherwise), the heap numpy uses: the driver's stages alternate Arrow reads and numpy
    passes, and what one frees the other then reuses. With Arrow's own pool (mimalloc) the memory it
    freed stayed with the process. With glibc, blocks of 1 MB and more are also always mapped on their
    own, so an (N,) array freed goes back to the system (glibc's default raises that threshold as
    large blocks are freed, and keeps them in its heap after). Together they took the select stage's
    peak at 10^6 rows from 846 to 714 MB (docs/benchmarks.md). Ray's workers keep their defaults."""
    import pyarrow as pa

    if "ARROW_DEFAULT_MEMORY_POOL" not in os.environ and pa.default_memory_pool().backend_name != "system":
        pa.set_memory_pool(pa.system_memory_pool())
    if "MALLOC_MMAP_THRESHOLD_" not in os.environ and platform.libc_ver()[0] == "glibc":
        import ctypes

        with contextlib.suppress(OSError, AttributeError):  # M_MMAP_THRESHOLD = -3: blocks of 1 MB and more are
            ctypes.CDLL("libc.so.6").mallopt(-3, 1 << 20)  # mapped, and unmapped when freed (glibc would raise it)


class Runner:
    """One run directory and its configuration: the context every stage runs in.

    ``cfg``: the resolved config (local paths made absolute: Ray workers run elsewhere); ``run_dir``:
    the run directory (a folder or an object-store URL); ``manifest``: manifest.json's content;
    ``stages``: the stage table (tests pass stand-ins).
    """

    def __init__(self, cfg: Config, verbose: bool = False, stages: tuple[Stage, ...] = STAGES):
        driver_memory_pool()
        self.cfg = absolute_paths(cfg)
        self.verbose = verbose  # Ray workers' logs reach the terminal only when asked for
        self.stages = stages
        self._table = {s.name: s for s in stages}
        self.run_dir = storage.location(cfg.output)
        storage.makedirs(self.run_dir)
        path = self.run_dir / "manifest.json"
        self.manifest: dict[str, Any] = read_json(path) if path.exists() else {"stages": {}}
        self.manifest.update(config=cfg.to_dict(), versions=versions())
        self.manifest.pop("ray_start_seconds", None)  # this run's, when it starts Ray
        write_text(self.run_dir / "config.yaml", yaml.safe_dump(cfg.to_dict(), sort_keys=False))
        self._done: dict[str, Done] = {}
        self._fingerprints: dict[str, str] = {}
        self._running: list[Stage] = []  # the stages being resolved, innermost last
        self.resources = Resources(start=self._start_ray)  # read once, when first asked
        self._ray_seconds = 0.0  # spent starting Ray: kept out of the stage that happened to start it
        self.started_ray = False  # this run started (or connected to) Ray: it shuts it down when stopped
        self.stopped_in: str | None = None  # the stage a signal stopped

    def _start_ray(self) -> None:
        from grads_ray.hub import MODEL_KEYS, PREFIX

        t0 = time.time()
        hub_models = any(str(path).startswith(PREFIX) for _, path in path_settings(self.cfg, MODEL_KEYS))
        was_up = True
        try:
            with stopping.deferred():  # a signal now stops the job once Ray is up (and can be shut down)
                import ray  # (first imported by deferred(), with signals held: a half-done import is unusable)

                was_up = ray.is_initialized()
                started = start_ray(self.cfg.ray, self.verbose, hub_models=hub_models)
        except stopping.Stopped:
            self.started_ray = self.started_ray or not was_up
            raise
        if started:
            self.started_ray = True
            self._ray_seconds += time.time() - t0
            self.manifest["ray_start_seconds"] = round(self._ray_seconds, 2)

    def ray(self) -> Resources:
        """Ray started (once: connected to ``ray.address``, else a local cluster of its own) and
        what the cluster offers."""
        self._start_ray()
        return self.resources

    # ---------------------------------------------------------------------------------- stages
    def run(self, end: str | None = None) -> Done:
        """Stage ``end`` (default: the whole job's last) and every stage it needs. -> its result."""
        whole = end is None
        start = time.time()
        end = end or job_end(self.cfg)
        done = self.need(end)  # and, through each stage's needs, every stage it needs
        if whole:
            self.manifest["total_seconds"] = round(time.time() - start, 2)
            self.save_manifest()
        return done

    def stage(self, name: str) -> Stage:
        """The table's stage ``name``."""
        return self._table[name]

    def need(self, name: str) -> Done:
        """The finished stage ``name``: memoised for this run, else found complete on disk (same
        fingerprint), else computed now. (Stages ask through their :class:`StageContext`, which
        holds them to their ``needs``.)"""
        if name in self._done:
            return self._done[name]
        stage = self._table[name]
        self._running.append(stage)
        try:
            done = self._resolve(stage)
        except KeyboardInterrupt:  # a signal (grads_ray/stopping.py)
            self.stopped_in = self.stopped_in or stage.name  # the innermost stage unwinds first
            raise
        finally:
            self._running.pop()
        self._done[name] = done
        return done

    def fingerprint(self, name: str) -> str:
        """Stage ``name``'s fingerprint, from the config alone (nothing runs): its name, the
        fingerprints of its needs in their order, its settings (:meth:`Stage.settings`)."""
        if name not in self._fingerprints:
            stage = self._table[name]
            self._fingerprints[name] = fingerprint(name, *(self.fingerprint(n) for n in stage.needs(self.cfg)),
                                                   *stage.settings(self.cfg))
        return self._fingerprints[name]

    def _resolve(self, stage: Stage) -> Done:
        fp = self.fingerprint(stage.name)
        ctx = StageContext(self, stage)
        for name in stage.needs(self.cfg):  # inputs first: the stage's clock and log lines are its own
            if name not in stage.while_running:
                self.need(name)
        out = Outputs(fp, {f: StageDir(self.run_dir, f) for f in stage.folders})
        main, *others = out.dirs.values()
        start, ray_before = time.time(), self._ray_seconds
        log.info("[grads-ray] %s ...", stage.name)
        finished = main.prepare(fp)
        missing = stage.missing_files(self.run_dir) if finished else []
        before: dict = {}  # a reopened stage's record: what the run that computed it measured
        if missing:  # finished, but a file the user reads is gone: finish it again (its shards are kept)
            log.warning("[grads-ray] %s: %s missing from %s: the stage is finished again", stage.name,
                        ", ".join(missing), self.run_dir)
            before = {k: v for k, v in main.success_info().items() if k != "fingerprint"}
            for d in out.dirs.values():
                d.reopen()
            finished = main.prepare(fp)
        if not finished:
            for d in others:
                d.prepare(fp)
            for f in (*stage.files, *stage.optional_files):  # no output of another run stays beside this one's
                storage.remove(self.run_dir / f)
            info = {**stage.run(ctx, out), **before}  # same result: a rerun over kept shards measures little
            for d in out.dirs.values():  # each folder one table with one schema, whatever its shards held
                unify_parts(d)
            for d in (*others, main):  # the first folder's marker last: it says the stage is done
                d.finish(fp, info)
        for name in stage.needs(self.cfg):  # a declared input this run has not read yet
            self.need(name)
        info = main.success_info()
        done = Done(stage.name, out, info, stage.value(ctx, out, info))
        entry = self.manifest["stages"].setdefault(stage.name, {})
        entry.update({k: v for k, v in info.items() if k != "fingerprint" and k not in stage.private})
        entry["seconds"] = round(time.time() - start - (self._ray_seconds - ray_before), 2)
        entry["driver_peak_mb"] = driver_peak_mb()
        try:
            self.manifest.update(stage.report(ctx, done))
            stage.check(ctx, done)
        finally:
            self.save_manifest()
        log.info("[grads-ray] %s done in %.1f s", stage.name, entry["seconds"])
        return done

    def save_manifest(self) -> None:
        write_json(self.run_dir / "manifest.json", self.manifest)


def driver_peak_mb() -> float:
    """This process's peak resident memory so far, MB: ``VmHWM`` (Linux; the kernel's high-water
    mark, which starts afresh at exec, so a job launched from a big process does not inherit its
    peak), else ``ru_maxrss`` (which on Linux would carry the launcher's across exec). It only
    grows over a job: a stage raised it when its figure is above the stage before."""
    import resource
    import sys

    try:
        with open("/proc/self/status") as fh:
            for line in fh:
                if line.startswith("VmHWM:"):
                    return round(int(line.split()[1]) / 1024, 1)
    except OSError:
        pass
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KB on Linux, bytes on macOS
    return round(peak / (2**20 if sys.platform == "darwin" else 2**10), 1)
