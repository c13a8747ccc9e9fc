"""CUDA graphs of the engine's device pass (``score.cuda_graphs``): a batch's thousands of kernels
replayed with one launch, one graph per batch shape, each trusted only once it gave an eager pass's bits.

On a GPU the engine's pass launches thousands of kernels, many of them small, and the device waits on
the host between them (busy 72% of the pass on the H200, docs/benchmarks.md). A CUDA graph records a
pass's kernels once and replays them without the host. A graph is fixed to its shapes, so the scorer
pads each batch's length up to a multiple of ``LENGTH_STEP`` (more right padding: the numbers move by
rounding only) and keeps one graph per (B, T).

Nothing is trusted untested. A shape is captured at its second batch, whose eager pass is what the
caller gets; the capture's replay of that batch must give the same bits, and so must the next
``CHECKS - 1`` batches of the shape, each run both ways. A shape whose replay differs is run eagerly
from then on, said once in the log; so are shapes past ``MAX_GRAPHS``. A capture that fails for want of
memory leaves its shape eager; one that fails otherwise (something in the pass waits for the device: a
mixture of experts' routing) leaves every shape eager. transformers skips the causal
mask when no token is padding, which it reads on the host in an eager pass and cannot in a capture:
a graphed scorer turns that shortcut off for every pass (:func:`same_attention`), so a replay and its
eager check run the same kernels.

The graphs share one memory pool: a replay's results are copied to the host before any other pass
runs, so one graph's scratch memory may be another's. The pool stays held beside what an eager check
needs, so ``score.batch_size=auto`` budgets half its usual fraction with graphs on. :class:`CudaGraphs`
is the CUDA part, apart from the bookkeeping, so the tests run the bookkeeping on a CPU with a stand-in.
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
MAX_GRAPHS = 24  # shapes captured per scorer; later ones run eagerly


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
    """Capture and replay on the current CUDA device, all graphs in one memory pool."""

    def __init__(self):
        self.pool = None

    def capture(self, fn: Callable[[], dict]) -> tuple[Any, dict]:
        """``fn`` once on a side stream (torch's docs ask for a warm-up before a capture), then captured.
        -> (graph, the tensors its replays write)."""
        import torch

        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            fn()
        torch.cuda.current_stream().wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, pool=self.pool):
            out = fn()
        self.pool = graph.pool()
        return graph, out

    def replay(self, graph: Any) -> None:
        graph.replay()


def graph_backend(device: Any) -> CudaGraphs | None:
    """The graphs of ``device``: CUDA's, or None (a CPU has none; the tests put a stand-in here)."""
    return CudaGraphs() if getattr(device, "type", str(device)) == "cuda" else None


@dataclass
class _Shape:
    seen: int = 0
    graph: Any = None
    static: tuple = ()
    out: dict | None = None
    checked: int = 0
    refused: str = ""
    counts: dict = field(default_factory=lambda: {"eager": 0, "replayed": 0})


class GraphedPass:
    """An engine's pass through CUDA graphs: ``(ids, labels, mask)`` (B, T) on the device -> the pass's
    pieces on the host (``reduce.to_host`` of ``engine.device_pass``), from a trusted graph's replay
    where there is one, else from an eager pass."""

    def __init__(self, engine: Any, backend: Any, *, checks: int = CHECKS, max_graphs: int = MAX_GRAPHS):
        self.engine, self.backend, self.checks, self.max_graphs = engine, backend, checks, max_graphs
        self.shapes: dict[tuple[int, int], _Shape] = {}
        self.off = ""  # why no shape is captured any more (a capture failed for a reason other than memory)

    def __call__(self, ids, labels, mask) -> dict[str, np.ndarray]:
        key = (int(ids.shape[0]), int(ids.shape[1]))
        shape = self.shapes.setdefault(key, _Shape())
        shape.seen += 1
        if shape.refused or (shape.graph is None and shape.seen < 2):
            return self._eager(shape, ids, labels, mask)
        if shape.graph is None:  # its second batch: eager, then captured and checked on it
            want = self._eager(shape, ids, labels, mask)
            if self.off:
                shape.refused = self.off
            elif sum(s.graph is not None for s in self.shapes.values()) >= self.max_graphs:
                shape.refused = f"more than {self.max_graphs} shapes"
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

    def _eager(self, shape: _Shape, ids, labels, mask) -> dict[str, np.ndarray]:
        shape.counts["eager"] += 1
        return to_host(self.engine.device_pass(ids, labels, mask, left_padded=False))

    def _capture(self, key, shape: _Shape, ids, labels, mask, want) -> None:
        static = tuple(t.clone() for t in (ids, labels, mask))
        try:
            graph, out = self.backend.capture(lambda: self.engine.device_pass(*static, left_padded=False))
        except Exception as exc:  # noqa: BLE001 - whatever stops a capture, the eager pass stands
            why = f"the capture failed ({type(exc).__name__}: {str(exc).splitlines()[0][:200] if str(exc) else ''})"
            if "OutOfMemory" not in type(exc).__name__:  # the pass itself cannot be captured: no other shape can
                self.off = why
                why += "; so is every other shape"
            self._refuse(key, shape, why)
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
            self._refuse(key, shape, f"its replay differs from the eager pass on {which} ({', '.join(differ)})")
        return not differ

    def _refuse(self, key, shape: _Shape, why: str) -> None:
        shape.refused, shape.graph, shape.static, shape.out = why, None, (), None
        log.warning("[grads-ray] score.cuda_graphs: batches of %d x %d run eagerly: %s", *key, why)
