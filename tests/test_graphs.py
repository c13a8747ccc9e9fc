"""``score.cuda_graphs`` (``gradients/graphs.py``): one graph per batch shape, trusted only once its replays
gave an eager pass's bits. CUDA graphs cannot run on a CPU, so the bookkeeping runs here with stand-ins
that keep a graph's semantics (its inputs and outputs are fixed tensors, read and written in place at each
replay; a capture computes nothing) or break them as a faulty capture would."""

from __future__ import annotations

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
    into the captured outputs, in place."""

    def __init__(self):
        self.captures = self.replays = 0

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


class Broken:
    """A capture that fails, as one does where the pass waits for the device."""

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


def test_a_failed_capture_leaves_every_shape_eager(tmp_path, caplog):
    """A pass that cannot be captured (it waits for the device) is so at every shape: one line in the
    log, no other capture tried."""
    engine = _engine(tmp_path)
    backend = Broken()
    run = graphs.GraphedPass(engine, backend)
    with caplog.at_level(logging.WARNING, logger="grads_ray"):
        for batch in _batches(16, seeds=(1, 2, 3)) + _batches(32, seeds=(1, 2, 3)):
            assert _same(run(*batch), graphs.to_host(engine.device_pass(*batch, left_padded=False)))
    why = "the capture failed (RuntimeError: operation not permitted when stream is capturing)"
    assert run.summary()["3x16"] == {"eager": 3, "replayed": 0, "refused": f"{why}; so is every other shape",
                                     "trusted": False}
    assert run.summary()["3x32"]["refused"] == why and backend.calls == 1
    assert caplog.text.count("run eagerly") == 1 and "3 x 16 run eagerly: the capture failed" in caplog.text


def test_a_capture_out_of_memory_leaves_only_its_shape_eager(tmp_path):
    class Full(Graphs):
        def capture(self, fn):
            if self.captures == 0:
                self.captures += 1
                raise torch.OutOfMemoryError("CUDA out of memory (a stand-in)")
            return super().capture(fn)

    engine = _engine(tmp_path)
    run = graphs.GraphedPass(engine, Full())
    for batch in _batches(16, seeds=(1, 2, 3)) + _batches(32, seeds=(1, 2, 3)):
        assert _same(run(*batch), graphs.to_host(engine.device_pass(*batch, left_padded=False)))
    assert "OutOfMemoryError" in run.summary()["3x16"]["refused"] and run.summary()["3x32"]["replayed"] == 2


def test_shapes_past_the_cap_run_eagerly(tmp_path):
    engine = _engine(tmp_path)
    run = graphs.GraphedPass(engine, Graphs(), max_graphs=1)
    for batch in _batches(16, seeds=(1, 2)) + _batches(32, seeds=(1, 2, 3)):
        run(*batch)
    assert run.summary()["3x16"]["trusted"] is False and run.summary()["3x16"]["replayed"] == 1
    assert run.summary()["3x32"]["refused"] == "more than 1 shapes"


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


def test_graphs_need_a_device_and_the_batched_engine(tmp_path):
    from grads_ray.gradients.scorer import Scorer

    save_tiny_model("llama", tmp_path / "m")
    assert graphs.graph_backend(torch.device("cpu")) is None
    assert Scorer(str(tmp_path / "m"), settings={"proj_dim": 8, "cuda_graphs": True}).graphs is None  # a CPU
    assert isinstance(graphs.graph_backend(torch.device("cuda")), graphs.CudaGraphs)


def test_graphs_halve_the_auto_batch_budget_and_are_not_fingerprinted():
    from grads_ray.config import load_config
    from grads_ray.gradients.batch_size import MEMORY_FRACTION, graphs_fraction
    from grads_ray.stages.score import _engine_numbers

    assert graphs_fraction({"cuda_graphs": True}) == MEMORY_FRACTION / 2
    assert graphs_fraction({"cuda_graphs": False}) == graphs_fraction({}) == MEMORY_FRACTION
    on, off = load_config(None, ["score.cuda_graphs=true"]), load_config(None, [])
    assert on.score.cuda_graphs and not off.score.cuda_graphs
    assert _engine_numbers(on) == _engine_numbers(off)
