"""The top-level ``deterministic`` setting (grads_ray/determinism.py): torch's deterministic kernels
around the scorer's and the training loops' passes, the process's own settings back after them, and
one line, not a traceback, for an op that has no deterministic kernel."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.utils.deterministic as fill

from grads_ray.determinism import deterministic, explain
from tests.conftest import save_tiny_model


def _flags():
    return (torch.are_deterministic_algorithms_enabled(), torch.is_deterministic_algorithms_warn_only_enabled(),
            fill.fill_uninitialized_memory)


def test_the_mode_is_on_inside_and_the_callers_settings_come_back():
    before = _flags()
    with deterministic(True):
        assert torch.are_deterministic_algorithms_enabled()
        assert not torch.is_deterministic_algorithms_warn_only_enabled()  # warn_only keeps attention's atomics
        assert fill.fill_uninitialized_memory is False
    assert _flags() == before
    torch.use_deterministic_algorithms(True, warn_only=True)  # a caller's own mode survives ours
    try:
        with deterministic(True):
            assert not torch.is_deterministic_algorithms_warn_only_enabled()
        assert torch.are_deterministic_algorithms_enabled() and torch.is_deterministic_algorithms_warn_only_enabled()
    finally:
        torch.use_deterministic_algorithms(before[0], warn_only=before[1])
    with deterministic(False):
        assert _flags() == before
    with pytest.raises(ValueError), deterministic(True):  # an error inside still restores
        raise ValueError("x")
    assert _flags() == before


def test_an_op_without_a_deterministic_kernel_is_one_line_naming_the_way_out():
    from grads_ray.stages.score_pass import failure_line

    with pytest.raises(RuntimeError) as caught, deterministic(True):
        torch.zeros(4).put_(torch.tensor([1, 1]), torch.tensor([1.0, 2.0]))  # no deterministic put_ anywhere
    line = explain(caught.value)
    assert line.startswith("put_ has no deterministic kernel") and "deterministic=false" in line
    assert failure_line(caught.value, when="scoring shard 3") == f"score: scoring shard 3: {line}"
    assert explain(RuntimeError("CUDA out of memory")) is None and explain(ValueError("x")) is None
    ray_train = Exception("Training failed.\nTraceback (most recent call last):\n  ...\nRuntimeError: "
                          "histc_cuda does not have a deterministic implementation, but you set ...")
    assert explain(ray_train).startswith("histc_cuda has no deterministic kernel")  # a worker's error, as Ray carries it


def test_a_mixture_of_experts_plain_step_gives_the_same_bits_twice_in_the_mode():
    """transformers' Qwen3-MoE forward+backward on two CPU threads differed between two passes over one
    batch (42 of 47 gradients at this size, measured 2026-12-04), and is the training loops' step."""
    from transformers import Qwen3MoeConfig, Qwen3MoeForCausalLM

    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        torch.manual_seed(0)
        model = Qwen3MoeForCausalLM(Qwen3MoeConfig(
            hidden_size=256, moe_intermediate_size=176, intermediate_size=688, num_hidden_layers=2,
            num_attention_heads=4, num_key_value_heads=4, head_dim=64, num_experts=16, num_experts_per_tok=4,
            vocab_size=1024))
        ids = torch.randint(0, 1024, (4, 128), generator=torch.Generator().manual_seed(1))

        def grads():
            model.zero_grad(set_to_none=True)
            model(input_ids=ids, labels=ids).loss.backward()
            return [p.grad.clone() for p in model.parameters() if p.grad is not None]

        with deterministic(True):
            first, second = grads(), grads()
        assert all(torch.equal(a, b) for a, b in zip(first, second, strict=True))
    finally:
        torch.set_num_threads(threads)


def test_the_scorer_runs_its_passes_in_the_mode_the_setting_asks(tmp_path):
    from grads_ray.gradients.scorer import Scorer

    save_tiny_model("qwen2", tmp_path / "model")
    rows = [np.arange(3, 3 + n) % 50 + 3 for n in (9, 14, 6)]  # odd lengths: a padded batch
    batch = {"id": np.array(["a", "b", "c"], dtype=object), "shard": np.zeros(3, np.int64),
             "source": np.array(["s"] * 3, dtype=object), "line": np.arange(3), "pos": np.arange(3),
             "input_ids": rows, "labels": [np.where(np.arange(len(r)) < 3, -100, r) for r in rows],
             "reason": np.array([""] * 3, dtype=object), "detail": np.array([""] * 3, dtype=object),
             "truncated": np.zeros(3, dtype=bool)}
    seen = {}
    for on in (True, False):
        scorer = Scorer(str(tmp_path / "model"), settings={"engine": "batched", "proj_dim": 16, "deterministic": on})
        engine = scorer.engine

        def recording(*args, engine=engine, on=on, **kwargs):
            seen[on] = torch.are_deterministic_algorithms_enabled()
            return engine(*args, **kwargs)

        scorer.engine = recording
        out = scorer(batch)
        assert np.isfinite(out["grad_norm"]).all()
        seen[(on, "after")] = torch.are_deterministic_algorithms_enabled()
    assert seen == {True: True, False: False, (True, "after"): False, (False, "after"): False}


@pytest.mark.parametrize("engine", ["auto", "batched"])
def test_an_op_without_a_deterministic_kernel_in_the_self_check_stops_the_scorer(engine, tmp_path, monkeypatch):
    """Not a failed self-check (which would score one example at a time, or refuse the model): the
    setting is what to change, and the line says so."""
    from grads_ray.gradients.reduce import Reducer
    from grads_ray.gradients.scorer import Scorer
    from grads_ray.stages.score_pass import failure_line

    save_tiny_model("llama", tmp_path / "model")
    flush = Reducer.flush

    def flush_with_put(self, state):
        torch.zeros(4).put_(torch.tensor([1, 1]), torch.tensor([1.0, 2.0]))
        return flush(self, state)

    monkeypatch.setattr(Reducer, "flush", flush_with_put)
    with pytest.raises(RuntimeError) as caught:
        Scorer(str(tmp_path / "model"), settings={"engine": engine, "proj_dim": 8, "deterministic": True})
    assert "deterministic=false" in failure_line(caught.value, when="the scorer could not start")
    off = Scorer(str(tmp_path / "model"), settings={"engine": engine, "proj_dim": 8, "deterministic": False})
    assert off.check.engine == "batched" and off.check.passed


def test_the_setting_changes_no_fingerprint(tmp_path):
    from grads_ray.config import load_config
    from grads_ray.stages.score import _engine_numbers

    on = load_config(None, [f"output={tmp_path}"])
    off = load_config(None, [f"output={tmp_path}", "deterministic=false"])
    assert on.deterministic is True and off.deterministic is False
    assert _engine_numbers(on) == _engine_numbers(off)
