"""``score.cuda_graphs`` (``gradients/graphs.py``): one graph per batch shape, trusted only once its replays
gave an eager pass's bits. CUDA graphs cannot run on a CPU, so the bookkeeping runs here with stand-ins
that keep a graph's semantics (its inputs and outputs are fixed tensors, read and written in place at each
replay; a capture computes nothing) or break them as a faulty capture would."""

from __future__ import annotations

import contextlib
import logging

import numpy as np
import pytest
import torch

from grads_ray.gradients import graphs
from grads_ray.gradients.engine import BatchedGradStats
from tests.conftest import VOCAB, save_tiny_model
from tests.reference import pad, random_examples


class _Graph:
    def __init__(self, fn, out):
        self.fn, self.out = fn, out


class Graphs:
    """A CUDA graph's semantics on a CPU: the capture computes nothing (its outputs hold NaN until a
    replay), a replay runs the captured function again on the captured inputs and writes the results
    into the captured outputs, in place. ``waits``: the eager passes wait for the device (as torch's
    sync debug mode would say); ``short``: what ``room`` answers (a capture would not fit)."""

    waits, short = False, ""

    def __init__(self):
        self.captures = self.replays = 0

    def eager(self, fn):
        return fn(), self.waits, 1000

    def room(self, peak):
        assert peak == 1000
        return self.short

    def capture(self, fn):
        self.captures += 1
        fn()  # the warm-up
        out = fn()
        for t in out.values():
            t.fill_(float("nan")) if t.is_floating_point() else t.zero_()
        return _Graph(fn, out), out

    def replay(self, graph):
        self.replays += 1
        new = graph.fn()
        for key, t in graph.out.items():
            t.copy_(new[key])


class Baked(Graphs):
    """A faulty capture: its replays leave what the captured batch gave, whatever the inputs."""

    def capture(self, fn):
        self.captures += 1
        out = fn()
        return _Graph(fn, out), out

    def replay(self, graph):
        self.replays += 1


class Idle(Graphs):
    """A graph whose replays do not run: its outputs stay as the capture left them (NaN)."""

    def replay(self, graph):
        self.replays += 1


class Broken(Graphs):
    """A capture that fails (one the sync debug mode did not foresee)."""

    calls = 0

    def capture(self, fn):
        self.calls += 1
        raise RuntimeError("operation not permitted when stream is capturing\nmore")

    def replay(self, graph):  # pragma: no cover - never reached
        raise AssertionError


def _engine(tmp_path, arch="llama"):
    model = save_tiny_model(arch, tmp_path / arch).eval()
    return BatchedGradStats(model, proj_dim=16, proj_rank=4, fisher_dim=8, fisher_rank=2)


def _batches(length: int, seeds=(1, 2, 3, 4)):
    """Batches of 3 rows, each padded (right) to ``length`` columns."""
    out = []
    for s in seeds:
        ids, lab, mask = pad(random_examples(3, seed=s, vocab=VOCAB, hi=length - 3), "right")
        out.append(graphs.pad_to(ids, lab, mask, length, 0))
    return out


def _same(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(np.array_equal(a[k], b[k], equal_nan=True) for k in a)


def test_padded_lengths_and_padding():
    assert [graphs.padded_length(t) for t in (1, 63, 64, 65, 511, 512)] == [64, 64, 64, 128, 512, 512]
    ids, lab, mask = (torch.ones((2, 5), dtype=torch.long) for _ in range(3))
    pi, pl, pm = graphs.pad_to(ids, lab, mask, 8, pad_id=7)
    assert pi.shape == (2, 8) and (pi[:, 5:] == 7).all() and (pl[:, 5:] == -100).all() and (pm[:, 5:] == 0).all()
    assert torch.equal(pi[:, :5], ids) and graphs.pad_to(ids, lab, mask, 5, 0)[0] is ids


def test_a_shape_is_captured_at_its_second_batch_and_trusted_after_its_checks(tmp_path):
    """Every result is the eager pass's, bit for bit; the graph is captured once, checked on the captured
    batch and one more, then replayed alone."""
    engine = _engine(tmp_path)
    backend = Graphs()
    run = graphs.GraphedPass(engine, backend)
    batches = _batches(16) + _batches(16, seeds=(5, 6))
    for i, batch in enumerate(batches):
        want = graphs.to_host(engine.device_pass(*batch, left_padded=False))
        assert _same(run(*batch), want), i
    assert backend.captures == 1
    summary = run.summary()["3x16"]
    # 6 batches: eager, eager + capture + replay, replay + eager, then 3 replays alone
    assert summary == {"eager": 3, "replayed": 5, "trusted": True}


def test_a_replay_that_ignores_its_inputs_is_caught_on_a_later_batch(tmp_path, caplog):
    """A value baked into the graph gives the captured batch's numbers right and the next batch's wrong:
    the second check refuses the shape, which runs eagerly from then on; every result is still right."""
    engine = _engine(tmp_path)
    run = graphs.GraphedPass(engine, Baked())
    with caplog.at_level(logging.WARNING, logger="grads_ray"):
        for batch in _batches(16) + _batches(16, seeds=(7,)):
            assert _same(run(*batch), graphs.to_host(engine.device_pass(*batch, left_padded=False)))
    shape = run.summary()["3x16"]
    assert "differs from the eager pass on a later batch" in shape["refused"] and not shape["trusted"]
    assert shape["replayed"] == 2 and caplog.text.count("run eagerly") == 1


def test_a_capture_that_computes_nothing_is_caught_on_its_own_batch(tmp_path):
    """A graph whose replay does not run (outputs as the capture left them: NaN) fails its first check."""

    engine = _engine(tmp_path)
    run = graphs.GraphedPass(engine, Idle())
    for batch in _batches(16, seeds=(1, 2, 3)):
        assert _same(run(*batch), graphs.to_host(engine.device_pass(*batch, left_padded=False)))
    assert "on the captured batch" in run.summary()["3x16"]["refused"]


def test_a_failed_capture_stops_all_captures(tmp_path, caplog):
    """A capture that fails: no other is tried (a failed capture leaves an old torch's allocator
    mid-capture); one line in the log; every result the eager pass's."""
    engine = _engine(tmp_path)
    backend = Broken()
    run = graphs.GraphedPass(engine, backend)
    with caplog.at_level(logging.WARNING, logger="grads_ray"):
        for batch in _batches(16, seeds=(1, 2, 3)) + _batches(32, seeds=(1, 2, 3)):
            assert _same(run(*batch), graphs.to_host(engine.device_pass(*batch, left_padded=False)))
    why = "a capture failed (RuntimeError: operation not permitted when stream is capturing)"
    assert run.summary()["3x16"] == {"eager": 3, "replayed": 0, "refused": why, "trusted": False}
    assert run.summary()["3x32"]["refused"] == why and backend.calls == 1
    assert caplog.text.count("cuda_graphs") == 1 and f"{why}; shapes not captured yet run eagerly" in caplog.text


def test_a_pass_that_waits_for_the_device_is_never_captured(tmp_path, caplog):
    backend = Graphs()
    backend.waits = True
    run = graphs.GraphedPass(_engine(tmp_path), backend)
    with caplog.at_level(logging.WARNING, logger="grads_ray"):
        for batch in _batches(16, seeds=(1, 2, 3)):
            run(*batch)
    assert backend.captures == 0 and "waits for the device" in run.summary()["3x16"]["refused"]
    assert caplog.text.count("cuda_graphs") == 1


def test_a_wait_on_a_shapes_first_pass_only_is_a_cache_filled(tmp_path):
    """A probe that reads the device once (a kernel checked on its first use) is no reason to give up."""

    class Once(Graphs):
        def eager(self, fn):
            out, _, peak = super().eager(fn)
            self.calls = getattr(self, "calls", 0) + 1
            return out, self.calls == 1, peak

    backend = Once()
    run = graphs.GraphedPass(_engine(tmp_path), backend)
    for batch in _batches(16, seeds=(1, 2, 3)):
        run(*batch)
    assert backend.captures == 1 and not run.off and run.summary()["3x16"]["trusted"]


def test_the_totals_for_the_manifest(tmp_path):
    engine = _engine(tmp_path)
    run = graphs.GraphedPass(engine, Baked(), max_differ=2)
    for length in (16, 32, 48):
        for batch in _batches(length, seeds=(1, 2, 3)):
            run(*batch)
    stopped = "the replays of 2 shapes differ from their eager passes"
    assert run.totals() == {"shapes": 3, "trusted": 0, "replayed": 4, "eager": 9, "stopped": stopped,
                            "refused": {"its replay differs from the eager pass on a later batch (columns, "
                                        "hidden_mean, grad_proj, fisher_gram)": 2, stopped: 1}}


def test_a_mixture_of_experts_is_never_captured(tmp_path):
    from tests.families import build_family

    model = build_family("qwen3_moe", tmp_path / "moe")
    backend = Graphs()
    run = graphs.GraphedPass(BatchedGradStats(model, proj_dim=8, fisher_dim=0), backend)
    batch = pad(random_examples(3, seed=1, vocab=model.config.vocab_size), "right")
    for _ in range(3):
        run(*batch)
    assert "mixture of experts" in run.off and backend.captures == 0


def test_a_capture_waits_for_the_room_it_needs(tmp_path):
    """Free memory short of the shape's eager peak: no capture now; a later batch, with room, captures."""
    engine = _engine(tmp_path)
    backend = Graphs()
    backend.short = "1.0 GiB free, 2.0 GiB needed"
    run = graphs.GraphedPass(engine, backend)
    batches = _batches(16, seeds=(1, 2, 3, 4, 5, 6))
    for batch in batches[:3]:
        run(*batch)
    assert backend.captures == 0 and not run.off
    backend.short = ""
    for batch in batches[3:]:
        assert _same(run(*batch), graphs.to_host(engine.device_pass(*batch, left_padded=False)))
    assert backend.captures == 1 and run.summary()["3x16"]["trusted"]
    backend.short = "1.0 GiB free, 2.0 GiB needed"
    for batch in _batches(32, seeds=(1, 2, 3, 4, 5)):
        run(*batch)
    assert run.summary()["3x32"]["refused"] == "no room for a capture (1.0 GiB free, 2.0 GiB needed)"
    assert backend.captures == 1 and not run.off  # after 3 tries; other shapes may still find room


def test_replays_that_differ_on_several_shapes_stop_all_captures(tmp_path):
    engine = _engine(tmp_path)
    backend = Baked()
    run = graphs.GraphedPass(engine, backend, max_differ=2)
    for length in (16, 32, 48, 64):
        for batch in _batches(length, seeds=(1, 2, 3)):
            assert _same(run(*batch), graphs.to_host(engine.device_pass(*batch, left_padded=False)))
    assert backend.captures == 2 and "the replays of 2 shapes differ" in run.off
    assert run.summary()["3x64"] == {"eager": 3, "replayed": 0, "refused": run.off, "trusted": False}


def test_a_capture_out_of_memory_stops_captures_too(tmp_path):
    """(On a torch before 2.12 a capture out of memory surfaces as an invalidated capture: no telling it
    apart; the room check before each capture is what keeps it from happening.)"""

    class Full(Graphs):
        def capture(self, fn):
            self.captures += 1
            raise torch.OutOfMemoryError("CUDA out of memory (a stand-in)")

    engine = _engine(tmp_path)
    run = graphs.GraphedPass(engine, Full())
    for batch in _batches(16, seeds=(1, 2, 3)) + _batches(32, seeds=(1, 2, 3)):
        assert _same(run(*batch), graphs.to_host(engine.device_pass(*batch, left_padded=False)))
    assert "OutOfMemoryError" in run.off and run.backend.captures == 1


def test_captures_past_the_cap_are_not_tried(tmp_path):
    engine = _engine(tmp_path)
    run = graphs.GraphedPass(engine, Graphs(), max_graphs=1)
    for batch in _batches(16, seeds=(1, 2, 3, 4)) + _batches(32, seeds=(1, 2, 3)):
        run(*batch)
    assert run.summary()["3x16"]["trusted"] is True and run.summary()["3x16"]["replayed"] == 3
    assert run.summary()["3x32"]["refused"] == "more than 1 captures" and run.backend.captures == 1


class Capturing(Graphs):
    """As :class:`Graphs`, with transformers seeing a capture underway in the capture and the replays, as
    on a GPU (``torch.cuda.is_current_stream_capturing``): it builds the attention mask even for a batch
    without padding, where an eager pass would skip it."""

    def __init__(self, monkeypatch):
        super().__init__()
        self.mp = monkeypatch

    def _capturing(self, fn, *args):
        with self.mp.context() as m:
            m.setattr(torch.cuda, "is_current_stream_capturing", lambda: True)
            return fn(*args)

    def capture(self, fn):
        return self._capturing(super().capture, fn)

    def replay(self, graph):
        return self._capturing(super().replay, graph)


@pytest.mark.parametrize("same", [True, False])
def test_without_the_same_attention_a_batch_without_padding_is_refused(same, tmp_path, monkeypatch):
    """A batch with no padding: eager passes skip the causal mask, a capture builds it; their bits differ
    (on this CPU too), and the shape would run eagerly. :func:`same_attention` around every pass (as the
    scorer does) makes them the same kernels: the graph is trusted."""
    engine = _engine(tmp_path)
    run = graphs.GraphedPass(engine, Capturing(monkeypatch))
    g = torch.Generator().manual_seed(0)
    batches = [(ids, ids.clone(), torch.ones_like(ids)) for ids in (torch.randint(3, VOCAB, (3, 64), generator=g)
                                                                       for _ in range(4))]
    with graphs.same_attention() if same else contextlib.nullcontext():
        for batch in batches:
            run(*batch)
    shape = run.summary()["3x64"]
    assert shape["trusted"] is same and ("refused" in shape) is not same, shape


def test_the_mask_shortcut_is_off_inside_and_back_after():
    from transformers import masking_utils

    real = masking_utils._ignore_causal_mask_sdpa
    mask = torch.ones((2, 6), dtype=torch.bool)
    assert real(mask, 6, 6, 0, 0)  # no padding: transformers would skip the mask, reading it on the host
    with graphs.same_attention():
        assert masking_utils._ignore_causal_mask_sdpa(mask, 6, 6, 0, 0) is False
    assert masking_utils._ignore_causal_mask_sdpa is real


def _unit(n: int, seed: int = 0):
    rng = np.random.default_rng(seed)
    rows = [rng.integers(3, VOCAB, size=int(k)) for k in rng.integers(5, 40, n)]
    return {"id": np.array([f"r{i}" for i in range(n)], dtype=object), "shard": np.zeros(n, np.int64),
            "source": np.array(["s"] * n, dtype=object), "line": np.arange(n), "pos": np.arange(n),
            "input_ids": rows, "labels": [np.where(np.arange(len(r)) < 3, -100, r) for r in rows],
            "reason": np.array([""] * n, dtype=object), "detail": np.array([""] * n, dtype=object),
            "truncated": np.zeros(n, dtype=bool)}


@pytest.mark.parametrize("arch", ["qwen2", "gpt2"])
def test_the_scorer_with_graphs_gives_its_eager_numbers(arch, tmp_path, monkeypatch):
    """``score.cuda_graphs`` in the scorer (stand-in graphs on a CPU): the same bits as the same scorer
    whose captures fail (every pass eager, the same padding), and the numbers of a scorer without graphs
    to float32's rounding (the lengths padded to 64 move them by rounding only). GPT-2's learned
    positions are never padded past."""
    from grads_ray.gradients import scorer as scorer_mod
    from grads_ray.gradients.scorer import Scorer

    save_tiny_model(arch, tmp_path / "m")
    settings = {"engine": "batched", "proj_dim": 16, "fisher_dim": 8}
    unit = _unit(40)
    plain = Scorer(str(tmp_path / "m"), settings=settings, batch_size=4, unit_rows=40)(unit)
    backends = {"works": Graphs(), "broken": Broken()}
    out = {}
    for name, backend in backends.items():
        monkeypatch.setattr(scorer_mod, "graph_backend", lambda device, b=backend: b)
        scorer = Scorer(str(tmp_path / "m"), settings={**settings, "cuda_graphs": True}, batch_size=4, unit_rows=40)
        assert scorer.graphs is not None
        out[name] = scorer(unit)
        if name == "works":
            assert backend.replays > 0 and any(s["trusted"] for s in scorer.graphs.summary().values())
            assert all(int(k.split("x")[1]) % 64 == 0 for k in scorer.graphs.summary())
            assert scorer.graph_length(100) == 128 and scorer.graph_length(127) == 128  # gpt2: 128 positions
            assert scorer.graph_length(129) == (129 if arch == "gpt2" else 192)
    for key in ("loss", "grad_norm", "grad_max", "grad_proj", "hidden_mean", "fisher_factor"):
        np.testing.assert_array_equal(out["works"][key], out["broken"][key], err_msg=key)
        if key != "fisher_factor":  # (its weakest directions are not determined to rounding: its Gram is, below)
            np.testing.assert_allclose(out["works"][key], plain[key], rtol=2e-4, atol=1e-6, err_msg=key)
    gram = [np.einsum("nrd,nre->nde", o["fisher_factor"], o["fisher_factor"]) for o in (out["works"], plain)]
    np.testing.assert_allclose(gram[0], gram[1], rtol=0, atol=2e-4 * np.abs(gram[1]).max())


def test_graphs_need_a_device_and_the_batched_engine(tmp_path, monkeypatch):
    from grads_ray.gradients import scorer as scorer_mod
    from grads_ray.gradients.scorer import Scorer

    save_tiny_model("llama", tmp_path / "m")
    assert graphs.graph_backend(torch.device("cpu")) is None
    assert Scorer(str(tmp_path / "m"), settings={"proj_dim": 8, "cuda_graphs": True}).graphs is None  # a CPU
    monkeypatch.setattr(graphs, "CudaGraphs", lambda: "CUDA's")
    assert graphs.graph_backend(torch.device("cuda")) == "CUDA's"
    monkeypatch.setattr(scorer_mod, "graph_backend", lambda device: Graphs())
    looped = Scorer(str(tmp_path / "m"), settings={"engine": "loop", "proj_dim": 8, "cuda_graphs": True})
    assert looped.graphs is None  # the per-example loop has no device pass to capture


def test_graphs_halve_the_auto_batch_budget_and_are_not_fingerprinted():
    from grads_ray.config import load_config
    from grads_ray.gradients.batch_size import MEMORY_FRACTION, graphs_fraction
    from grads_ray.stages.score import _engine_numbers

    assert graphs_fraction({"cuda_graphs": True}) == MEMORY_FRACTION / 2
    assert graphs_fraction({"cuda_graphs": False}) == graphs_fraction({}) == MEMORY_FRACTION
    on, off = load_config(None, ["score.cuda_graphs=true"]), load_config(None, [])
    assert on.score.cuda_graphs and not off.score.cuda_graphs
    assert _engine_numbers(on) == _engine_numbers(off)


def _fake_cuda(monkeypatch, calls: list):
    """torch.cuda's calls that :class:`graphs.CudaGraphs` makes, recorded, on a CPU."""

    class Stream:
        def wait_stream(self, other):
            calls.append("wait")

    class Graph:
        def replay(self):
            calls.append("replay")

    main = Stream()
    state = {"mode": 0, "free": 10 << 30}
    fakes = {"Stream": Stream, "graph_pool_handle": lambda: (0, 7), "current_device": lambda: 0,
             "current_stream": lambda: main, "stream": lambda s: contextlib.nullcontext(), "CUDAGraph": Graph,
             "set_stream": lambda s: calls.append(("set_stream", s is main)),
             "memory_allocated": lambda: 100, "max_memory_allocated": lambda: 350,
             "reset_peak_memory_stats": lambda: None, "get_sync_debug_mode": lambda: state["mode"],
             "set_sync_debug_mode": lambda m: state.update(mode=m), "mem_get_info": lambda: (state["free"], 1 << 40),
             "empty_cache": lambda: calls.append("empty_cache")}
    for name, value in fakes.items():
        monkeypatch.setattr(torch.cuda, name, value, raising=False)
    monkeypatch.setattr(torch._C, "_cuda_endAllocateToPool", lambda d, p: calls.append(("end_pool", d, p)),
                        raising=False)
    return state


def test_cuda_graphs_watch_the_eager_pass_and_keep_its_warnings(monkeypatch):
    import warnings

    state = _fake_cuda(monkeypatch, [])
    backend = graphs.CudaGraphs()

    def waits():
        warnings.warn("called a synchronizing CUDA operation", UserWarning, stacklevel=1)
        warnings.warn("the pass's own", RuntimeWarning, stacklevel=1)
        return {"x": torch.zeros(1)}

    with pytest.warns(RuntimeWarning, match="the pass's own"):
        out, waited, peak = backend.eager(waits)
    assert waited and peak == 250 and state["mode"] == 0  # the debug mode put back
    assert backend.eager(lambda: {})[1] is False


def test_cuda_graphs_room_releases_the_cache_first(monkeypatch):
    calls = []
    state = _fake_cuda(monkeypatch, calls)
    backend = graphs.CudaGraphs()
    assert backend.room(4 << 30) == "" and "empty_cache" not in calls
    state["free"] = 2 << 30
    assert backend.room(4 << 30) == "2.0 GiB free, 5.0 GiB needed" and "empty_cache" in calls


def test_a_failed_cuda_capture_puts_the_stream_and_the_pool_back(monkeypatch):
    calls = []
    _fake_cuda(monkeypatch, calls)

    @contextlib.contextmanager
    def failing(graph, pool=None, stream=None):
        calls.append(("capture", pool, stream is backend.stream))
        raise RuntimeError("operation not permitted when stream is capturing")
        yield

    monkeypatch.setattr(torch.cuda, "graph", failing)
    backend = graphs.CudaGraphs()
    with pytest.raises(RuntimeError, match="not permitted"):
        backend.capture(lambda: calls.append("pass") or {})
    assert calls == ["wait", "pass", "wait", ("capture", (0, 7), True), ("set_stream", True), ("end_pool", 0, (0, 7))]
    assert backend.kept == []
