"""CUDA graphs of the engine's device pass (``score.cuda_graphs``): a batch's thousands of kernels
replayed with one launch, one graph per batch shape, each trusted only once it gave an eager pass's bits.

On a GPU the engine's pass launches thousands of kernels, many of them small, and the device waits on
the host between them (busy 72% of the pass on the H200, docs/benchmarks.md). A CUDA graph records a
pass's kernels once and replays them without the host. A graph is fixed to its shapes, so the scorer
pads each batch's length up to a multiple of ``LENGTH_STEP`` (more right padding: the numbers move by
rounding only) and keeps one graph per (B, T).

Nothing is trusted untested. A shape is captured at its second batch, whose eager pass is what the
caller gets; the capture's replay of that batch must give the same bits, and so must the next
``CHECKS - 1`` batches of the shape, each run both ways. A shape whose replay differs runs eagerly from
then on, said once in the log; after ``MAX_DIFFER`` such shapes, or ``MAX_GRAPHS`` captures, no more
are captured. No capture is tried of a pass that waits for the device (a mixture of experts' routing,
transformers' flash-attention masks: torch's sync debug mode watches the eager pass just before a
capture; a shape's first pass may read the device once to fill a cache), nor where the free memory is short of the shape's eager peak: a capture that fails leaves a
torch before 2.12 with its allocator mid-capture (pytorch#180395); one that fails anyway stops all
captures, the process's stream and allocator put back as far as torch lets. transformers skips the causal
mask when no token is padding, which it reads on the host in an eager pass and cannot in a capture:
a graphed scorer turns that shortcut off for every pass (:func:`same_attention`), so a replay and its
eager check run the same kernels.

The graphs share one memory pool: a replay's results are copied to the host before any other pass
runs, so one graph's scratch memory may be another's. Shapes come in rising lengths (batches are
length-sorted), so the pool may grow with each; it stays held beside what an eager check needs, so
``score.batch_size=auto`` budgets half its usual fraction with graphs on, and a shape is captured only
where free memory allows. :class:`CudaGraphs` is the CUDA part, apart from the bookkeeping, so the
tests run the bookkeeping on a CPU with stand-ins.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from grads_ray.gradients.reduce import to_host

log = logging.getLogger("grads_ray")

LENGTH_STEP = 64  # batch lengths are padded up to a multiple of this with graphs on (one graph per multiple)
CHECKS = 2  # batches of a shape run both ways (replay and eager) before its graph is trusted
MAX_GRAPHS = 24  # captures per scorer; later shapes run eagerly
MAX_DIFFER = 3  # shapes whose replay differs from their eager pass before no more are captured
ROOM_TRIES = 3  # batches of a shape that find too little free memory for its capture before it runs eagerly


def padded_length(t: int, step: int = LENGTH_STEP) -> int:
    """A batch of length t padded to the next multiple of ``step`` (t >= 1)."""
    return -(-max(t, 1) // step) * step


def pad_to(ids, labels, mask, length: int, pad_id: int):
    """Right-pad a (B, T) batch to ``length`` columns: ids with ``pad_id``, labels with -100, mask 0."""
    import torch.nn.functional as F

    extra = length - ids.shape[1]
    if extra <= 0:
        return ids, labels, mask
    return F.pad(ids, (0, extra), value=pad_id), F.pad(labels, (0, extra), value=-100), F.pad(mask, (0, extra), value=0)


@contextlib.contextmanager
def same_attention() -> Iterator[None]:
    """transformers' SDPA causal-mask shortcut off (``masking_utils._ignore_causal_mask_sdpa``): the
    mask is built for every batch, as it is while a stream captures. Where transformers has no such
    function, nothing changes (a replay that then differs from its eager pass is refused)."""
    try:
        from transformers import masking_utils
    except ImportError:  # pragma: no cover - transformers is a dependency
        yield
        return
    real = getattr(masking_utils, "_ignore_causal_mask_sdpa", None)
    if real is None:
        yield
        return
    masking_utils._ignore_causal_mask_sdpa = lambda *a, **k: False
    try:
        yield
    finally:
        masking_utils._ignore_causal_mask_sdpa = real


class CudaGraphs:
    """Capture and replay on the current CUDA device: warm-up and capture on one stream of its own
    (cuBLAS makes its workspace for that stream in the warm-up, outside the graphs' pool), every graph
    in one pool, kept alive (a refused graph too: the pool lives while one of its graphs does)."""

    HEADROOM = 1.25  # free memory a capture needs, in eager peaks of its shape

    def __init__(self):
        import torch

        self.stream = torch.cuda.Stream()
        self.pool = torch.cuda.graph_pool_handle()
        self.device = torch.cuda.current_device()
        self.kept: list[Any] = []

    def eager(self, fn: Callable[[], dict]) -> tuple[dict, bool, int]:
        """An eager pass, watched: -> (its tensors, whether it waited for the device (torch's sync debug
        mode: a capture of it would fail, and a failed capture leaves a torch before 2.12 in a state its
        allocator cannot recover from, pytorch#180395), its peak bytes above what was allocated before)."""
        import warnings

        import torch

        before = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        mode = torch.cuda.get_sync_debug_mode()
        torch.cuda.set_sync_debug_mode("warn")
        try:
            with warnings.catch_warnings(record=True) as seen:
                warnings.simplefilter("always")
                out = fn()
        finally:
            torch.cuda.set_sync_debug_mode(mode)
        synced = False
        for w in seen:
            if "synchroniz" in str(w.message):
                synced = True
            else:  # the pass's own warnings, as they would have been
                warnings.warn_explicit(w.message, w.category, w.filename, w.lineno)
        return out, synced, torch.cuda.max_memory_allocated() - before

    def room(self, peak: int) -> str:
        """'' when a capture of a pass peaking at ``peak`` bytes fits in the free memory (the allocator's
        cached blocks released first where it would not: a capture cannot release them), else why not."""
        import torch

        need = self.HEADROOM * peak
        if torch.cuda.mem_get_info()[0] < need:
            torch.cuda.empty_cache()
        free = torch.cuda.mem_get_info()[0]
        return "" if free >= need else f"{free / 2**30:.1f} GiB free, {need / 2**30:.1f} GiB needed"

    def capture(self, fn: Callable[[], dict]) -> tuple[Any, dict]:
        """``fn`` once on the stream (the warm-up torch's docs ask for), then captured there.
        -> (graph, the tensors its replays write)."""
        import torch

        before = torch.cuda.current_stream()
        self.stream.wait_stream(before)
        with torch.cuda.stream(self.stream):
            fn()
        before.wait_stream(self.stream)
        graph = torch.cuda.CUDAGraph()
        try:
            with torch.cuda.graph(graph, pool=self.pool, stream=self.stream):
                out = fn()
        except BaseException:
            self._recover(before)
            raise
        self.kept.append(graph)
        return graph, out

    def _recover(self, stream: Any) -> None:
        """After a failed capture: this thread's stream back, and the allocator told the pool's capture
        has ended (a torch before 2.12 leaves both as the capture had them when ending it raises)."""
        import torch

        torch.cuda.set_stream(stream)
        try:
            torch._C._cuda_endAllocateToPool(self.device, self.pool)
        except Exception:  # noqa: BLE001, S110 - already ended (a newer torch): nothing to undo
            pass

    def replay(self, graph: Any) -> None:
        graph.replay()


def graph_backend(device: Any) -> CudaGraphs | None:
    """The graphs of ``device``: CUDA's, or None (a CPU has none; the tests put a stand-in here)."""
    return CudaGraphs() if getattr(device, "type", str(device)) == "cuda" else None


@dataclass
class _Shape:
    seen: int = 0
    peak: int = 0  # an eager pass's peak bytes
    short: int = 0  # captures put off for want of free memory
    graph: Any = None
    static: tuple = ()
    out: dict | None = None
    checked: int = 0
    refused: str = ""
    counts: dict = field(default_factory=lambda: {"eager": 0, "replayed": 0})


class GraphedPass:
    """An engine's pass through CUDA graphs: ``(ids, labels, mask)`` (B, T) on the device -> the pass's
    pieces on the host (``reduce.to_host`` of ``engine.device_pass``), from a trusted graph's replay
    where there is one, else from an eager pass.

    ``backend``: ``eager(fn)`` -> (tensors, waited for the device?, peak bytes), ``room(peak)`` -> '' or why
    a capture would not fit, ``capture(fn)`` -> (graph, tensors), ``replay(graph)`` (:class:`CudaGraphs`)."""

    def __init__(self, engine: Any, backend: Any, *, checks: int = CHECKS, max_graphs: int = MAX_GRAPHS,
                 max_differ: int = MAX_DIFFER):
        self.engine, self.backend, self.checks = engine, backend, checks
        self.max_graphs, self.max_differ = max_graphs, max_differ
        self.shapes: dict[tuple[int, int], _Shape] = {}
        self.captures = self.differ = 0
        self.off = ""  # why no shape is captured any more
        if any("experts" in use.rules() for use in getattr(engine, "uses", [])):
            self._stop("a mixture of experts' routing is read on the host: its passes cannot be captured")

    def __call__(self, ids, labels, mask) -> dict[str, np.ndarray]:
        key = (int(ids.shape[0]), int(ids.shape[1]))
        shape = self.shapes.setdefault(key, _Shape())
        shape.seen += 1
        if shape.graph is None:
            if shape.refused or self.off:
                shape.refused = shape.refused or self.off
                return self._eager(shape, ids, labels, mask)
            want = self._watched(shape, ids, labels, mask)
            if self.off:
                shape.refused = self.off
            elif shape.seen >= 2:  # its second batch: captured and checked on it
                if self.captures >= self.max_graphs:
                    shape.refused = f"more than {self.max_graphs} captures"
                    self._stop(shape.refused)
                else:
                    self._capture(key, shape, ids, labels, mask, want)
            return want
        got = self._replay(shape, ids, labels, mask)
        if shape.checked < self.checks:
            want = self._eager(shape, ids, labels, mask)
            if not self._same(key, shape, got, want, "a later batch"):
                return want
            shape.checked += 1
        return got

    def summary(self) -> dict[str, Any]:
        """Per shape ``"BxT"``: batches replayed and run eagerly, and why a shape is not graphed."""
        return {f"{b}x{t}": {**s.counts, **({"refused": s.refused} if s.refused else {}),
                             "trusted": s.graph is not None and s.checked >= self.checks}
                for (b, t), s in self.shapes.items()}

    def totals(self) -> dict[str, Any]:
        """The scorer's graphs in a few numbers (the score stage's manifest): shapes seen and trusted,
        batches replayed and run eagerly, why captures stopped, and the shapes refused by reason."""
        refused: dict[str, int] = {}
        for s in self.shapes.values():
            if s.refused:
                refused[s.refused] = refused.get(s.refused, 0) + 1
        summary = self.summary().values()
        return {"shapes": len(self.shapes), "trusted": sum(v["trusted"] for v in summary),
                "replayed": sum(v["replayed"] for v in summary), "eager": sum(v["eager"] for v in summary),
                "stopped": self.off, "refused": refused}

    def _eager(self, shape: _Shape, ids, labels, mask) -> dict[str, np.ndarray]:
        shape.counts["eager"] += 1
        return to_host(self.engine.device_pass(ids, labels, mask, left_padded=False))

    def _watched(self, shape: _Shape, ids, labels, mask) -> dict[str, np.ndarray]:
        """An eager pass of a shape not yet captured, watched for waits on the device (a capture of a pass
        that waits fails: none is tried) and its peak memory (a capture needs about as much free)."""
        shape.counts["eager"] += 1
        out, waited, peak = self.backend.eager(lambda: self.engine.device_pass(ids, labels, mask, left_padded=False))
        shape.peak = max(shape.peak, peak)
        if waited and shape.seen >= 2:  # (a shape's first pass may fill a cache once, a kernel's probe)
            self._stop("the pass waits for the device (torch's sync debug mode saw it): it cannot be captured")
        return to_host(out)

    def _capture(self, key, shape: _Shape, ids, labels, mask, want) -> None:
        short = self.backend.room(shape.peak)
        if short:  # not now; one of the next batches of the shape may find the room
            shape.short += 1
            if shape.short >= ROOM_TRIES:
                shape.refused = f"no room for a capture ({short})"
                log.info("[grads-ray] score.cuda_graphs: batches of %d x %d run eagerly: %s", *key, shape.refused)
            return
        self.captures += 1
        static = tuple(t.clone() for t in (ids, labels, mask))
        try:
            graph, out = self.backend.capture(lambda: self.engine.device_pass(*static, left_padded=False))
        except Exception as exc:  # noqa: BLE001 - whatever stops a capture, the eager pass stands
            self._stop(f"a capture failed ({type(exc).__name__}: {str(exc).splitlines()[0][:200] if str(exc) else ''})")
            shape.refused = self.off
            return
        shape.graph, shape.static, shape.out = graph, static, out
        got = self._replay(shape, ids, labels, mask)
        if self._same(key, shape, got, want, "the captured batch"):
            shape.checked = 1

    def _replay(self, shape: _Shape, ids, labels, mask) -> dict[str, np.ndarray]:
        for s, t in zip(shape.static, (ids, labels, mask), strict=True):
            s.copy_(t)
        self.backend.replay(shape.graph)
        shape.counts["replayed"] += 1
        return to_host(shape.out)

    def _same(self, key, shape: _Shape, got: dict, want: dict, which: str) -> bool:
        differ = [k for k in want if not np.array_equal(got[k], want[k], equal_nan=True)]
        if differ:
            shape.refused, shape.graph, shape.static, shape.out = (
                f"its replay differs from the eager pass on {which} ({', '.join(differ)})", None, (), None)
            log.warning("[grads-ray] score.cuda_graphs: batches of %d x %d run eagerly: %s", *key, shape.refused)
            self.differ += 1
            if self.differ >= self.max_differ:
                self._stop(f"the replays of {self.differ} shapes differ from their eager passes")
        return not differ

    def _stop(self, why: str) -> None:
        """No more captures: ``why``, said once; the graphs trusted so far keep being replayed."""
        if not self.off:
            self.off = why
            log.warning("[grads-ray] score.cuda_graphs: %s; shapes not captured yet run eagerly", why)
