"""The batched engine on every model family of tests/families.py: exact against the float64
one-example-at-a-time reference (every statistic, overall and per group, the projection, the hidden
features), with masked prompts, odd lengths, padding on either side; the self-check passes on each in
float32; and a rule perturbed by 1% is caught by the self-check on each, which then falls back to the
loop (``auto``) or refuses (``batched``)."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch

from grads_ray.gradients.engine import BatchedGradStats
from grads_ray.gradients.selfcheck import ModelRefused, build_engine, run_check, synthetic_examples
from grads_ray.gradients.stats import LoopGradStats
from tests.families import FAMILIES, MOE, VOCAB, build_family, eager_experts
from tests.reference import check_against_reference, pad, random_examples


@pytest.fixture(scope="module")
def family_dir(tmp_path_factory):
    return tmp_path_factory.mktemp("families")


_BUILT: dict[str, torch.nn.Module] = {}


def _model(family: str, root):
    """The family's tiny model, built and loaded from its folder once per test session."""
    if family not in _BUILT:
        _BUILT[family] = build_family(family, root / family)
    return copy.deepcopy(_BUILT[family])


@pytest.mark.parametrize("family", list(FAMILIES))
def test_family_exact_against_float64_reference(family, family_dir):
    model64 = eager_experts(_model(family, family_dir)).double()
    engine = BatchedGradStats(model64, proj_dim=40, proj_rank=4, seed=2, fisher_dim=8, fisher_rank=2)
    side = "left" if family in ("llama", "qwen3", "gemma3_text", "mixtral", "gpt2") else "right"
    examples = random_examples(4, seed=sum(map(ord, family)), vocab=VOCAB - 7, lo=4, hi=21)
    out = check_against_reference(engine, model64, examples, side, 1e-5)
    assert np.isfinite(out.grad_proj).all()
    if family in MOE:
        assert "experts" in {e.rule for use in engine.uses for e in use.entries}


@pytest.mark.parametrize("family", ["mixtral", "gpt_oss"])
def test_experts_reduced_a_chunk_at_a_time_change_nothing(family, family_dir):
    """Every expert of a weight in one stack, or one expert per chunk (``hold_bytes=0``): the same
    numbers to rounding, each weight's own moments included; and exact against the reference."""
    model64 = eager_experts(_model(family, family_dir)).double()
    examples = random_examples(5, seed=11, vocab=VOCAB - 7, lo=4, hi=19)
    settings = dict(proj_dim=40, proj_rank=4, seed=2, fisher_dim=0, keep_params=True)
    whole = check_against_reference(BatchedGradStats(model64, **settings), model64, examples, "right", 1e-5)
    chunked = check_against_reference(BatchedGradStats(model64, hold_bytes=0, **settings), model64, examples,
                                      "right", 1e-5)
    experts = [n for n in whole.params if n.split(".")[-1] in ("gate_up_proj", "up_proj", "down_proj", "w1", "w2", "w3")
               and ".experts." in n]
    assert experts, list(whole.params)
    for name, m in whole.params.items():
        for k in ("s", "ss", "mx", "mn"):
            np.testing.assert_allclose(chunked.params[name][k], m[k], rtol=1e-12, atol=1e-300, err_msg=name)


@pytest.mark.parametrize("family", ["mixtral", "gpt_oss"])
def test_experts_in_cut_stacks_change_nothing(family, family_dir, monkeypatch):
    """The padded path cut into levels (:func:`experts.stack_levels`, forced here wherever a cut saves
    any row) gives the one stack's numbers to rounding, each weight's own moments included, and stays
    exact against the reference; the module's own forward still agrees."""
    from grads_ray.gradients import experts as moe

    model64 = eager_experts(_model(family, family_dir)).double()
    examples = random_examples(5, seed=11, vocab=VOCAB - 7, lo=4, hi=19)
    settings = dict(proj_dim=40, proj_rank=4, seed=2, fisher_dim=0, keep_params=True)
    whole = check_against_reference(BatchedGradStats(model64, **settings), model64, examples, "right", 1e-5)
    real, plans = moe.stack_levels, []

    def cut(counts, row_cost, expert_cost, **kw):
        plans.append(real(counts, row_cost, 0, gain=1.0))
        return plans[-1]

    monkeypatch.setattr(moe, "stack_levels", cut)
    assert all(moe.check_equivalent(m) is None for m in model64.modules() if hasattr(m, "down_proj") and m.down_proj.dim() == 3)
    levels = check_against_reference(BatchedGradStats(model64, **settings), model64, examples, "right", 1e-5)
    assert max(len(p) for p in plans) >= 2, plans  # some call was cut
    for name, m in whole.params.items():
        for k in ("s", "ss", "mx", "mn"):
            # float64 rounding: a router's entry sum is exactly zero (softmax), ~1e-18 either way
            np.testing.assert_allclose(levels.params[name][k], m[k], rtol=1e-10, atol=1e-15, err_msg=name)


@pytest.mark.parametrize("family", list(FAMILIES))
def test_self_check_passes_in_float32(family, family_dir):
    model = _model(family, family_dir)
    engine, result = build_engine(model, {"engine": "batched", "proj_dim": 32, "proj_rank": 4, "fisher_dim": 0},
                                  synthetic_examples(VOCAB, n=4, seed=1), pad_id=0)
    assert isinstance(engine, BatchedGradStats), result.reason
    assert result.passed, result.reason
    # what is written (loss, every statistic, the features) within 1e-5; a parameter's own moments are
    # rounding noise where its exact gradient is zero (a key bias under softmax), floored, <= 2e-3
    assert max(v for k, v in result.errors.items() if k != "parameters") <= 1e-5, result.errors
    assert result.rows == 4 and len(set(result.tokens)) == 4


def _rule_kinds(engine: BatchedGradStats) -> dict[str, str]:
    """rule -> the first parameter it covers."""
    kinds: dict[str, str] = {}
    for use in engine.uses:
        for e in use.entries:
            kinds.setdefault(e.rule, e.name)
    return kinds


def _perturb(monkeypatch, name: str, factor: float = 1.01) -> None:
    """Every term of one parameter scaled by ``factor``: that rule, wrong by 1%."""
    from grads_ray.gradients.reduce import Reducer
    from grads_ray.gradients.scorer import perturbed_add

    monkeypatch.setattr(Reducer, "add", perturbed_add(Reducer.add, name, factor))


@pytest.mark.parametrize("family", list(FAMILIES))
def test_a_rule_off_by_one_percent_is_caught(family, family_dir, monkeypatch):
    """Each rule the family uses, perturbed in turn: the check names that parameter, ``auto`` falls back
    to the per-example loop and ``batched`` refuses; nothing is scored by the broken engine."""
    model = _model(family, family_dir)
    examples = synthetic_examples(VOCAB, n=3, seed=2)
    settings = {"proj_dim": 0, "fisher_dim": 0}
    kinds = _rule_kinds(BatchedGradStats(model, **settings))
    assert {"linear", "embedding"} <= set(kinds) or family == "gpt2"
    for rule, name in kinds.items():
        with monkeypatch.context() as m:
            _perturb(m, name)
            result = run_check(BatchedGradStats(model, **settings), model, examples, pad_id=0)
            assert not result.passed and result.engine == "loop", (rule, name, result.max_rel_error)
            assert result.failures and result.failures[0].startswith(f"{name}: batched grad differs"), result.failures
            engine, got = build_engine(model, {"engine": "auto", **settings}, examples, pad_id=0)
            assert isinstance(engine, LoopGradStats) and got.engine == "loop" and name in got.reason
            with pytest.raises(ModelRefused, match=rf"score\.engine=batched: .*{name}: batched grad differs"):
                build_engine(model, {"engine": "batched", **settings}, examples, pad_id=0)


@pytest.mark.parametrize("family", ["qwen3", "mixtral"])
def test_bfloat16_model_checked_in_its_dtype_and_in_float32(family, family_dir):
    """A bfloat16 model: the check runs in bfloat16 (within its rounding) and again with the parameters
    cast to float32 and back, exactly: the model is bit-identical afterwards."""
    model = _model(family, family_dir).to(torch.bfloat16)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    engine, result = build_engine(model, {"engine": "batched", "proj_dim": 16, "fisher_dim": 0},
                                  synthetic_examples(VOCAB, n=3), pad_id=0)
    assert result.passed and result.dtype == "bfloat16" and result.float32["passed"], result
    assert result.max_rel_error < 0.1 and result.float32["max_rel_error"] < 1e-4
    assert all(p.dtype == torch.bfloat16 and torch.equal(p, before[n]) for n, p in model.named_parameters())


@pytest.mark.parametrize("family", list(FAMILIES))
def test_the_gpus_paths_pass_the_self_check_in_bfloat16(family, family_dir, monkeypatch):
    """What a GPU runs in bfloat16, here on the CPU: the sketch of half factors with float32 results
    (``factored.HALF_OUT``, emulated) and ``score.fused_moments``'s kernel (Triton's interpreter). The
    self-check passes on every family, in bfloat16 and in float32, and the kernel took part in both."""
    import os

    from grads_ray.gradients import factored, fused

    if os.environ.get("TRITON_INTERPRET") != "1" or not fused.usable(torch.zeros((1, 1, 1), dtype=torch.bfloat16)):
        pytest.skip("no Triton interpreter here (tests/conftest.py sets it where there is no GPU)")
    monkeypatch.setitem(factored.HALF_OUT, "cpu", "emulate")
    calls, vectors = [], []
    real, real_vectors = fused.tile_moments, fused.vector_sums
    monkeypatch.setattr(fused, "tile_moments", lambda *a, **k: calls.append(a[0].dtype) or real(*a, **k))
    monkeypatch.setattr(fused, "vector_sums", lambda *a, **k: vectors.append((a[0].dtype, a[3])) or real_vectors(*a, **k))
    model = _model(family, family_dir).to(torch.bfloat16)
    engine, result = build_engine(model, {"engine": "batched", "proj_dim": 16, "proj_rank": 4, "fisher_dim": 0,
                                          "fused_moments": True}, synthetic_examples(VOCAB, n=3, seed=4), pad_id=0)
    assert result.passed and result.float32["passed"], result.reason
    assert {torch.bfloat16, torch.float32} <= set(calls)  # the kernel in both passes
    # the vector kernel too (biases, norm weights), but for Cohere, whose LayerNorm is not torch's: its
    # ∂y/∂w comes from forward-mode AD (rules.norm_jacobian), formed before any stack
    assert ({d for d, _ in vectors} == {torch.bfloat16, torch.float32}) != (family == "cohere"), vectors


def test_loop_engine_covers_what_the_batched_engine_refuses(family_dir):
    """A model with no batched rule for one parameter: ``auto`` scores it with the loop and says why."""
    from grads_ray.gradients import rules

    model = _model("llama", family_dir)
    model.model.layers[0].mlp.register_parameter("scale", torch.nn.Parameter(torch.ones(40)))
    old = rules.REPLAY_MAX
    rules.REPLAY_MAX = 8
    try:
        engine, result = build_engine(copy.deepcopy(model), {"engine": "auto", "proj_dim": 0, "fisher_dim": 0},
                                      synthetic_examples(VOCAB, n=2), pad_id=0)
    finally:
        rules.REPLAY_MAX = old
    assert isinstance(engine, LoopGradStats) and result.passed is None
    assert "model.layers.0.mlp.scale (LlamaMLP, 40 entries)" in result.reason


def test_a_float32_pass_that_does_not_fit_leaves_the_bfloat16_verdict(family_dir, monkeypatch):
    """A half-precision model too large for its float32 copy on the device: the check in its own dtype
    stands (said in the log and the result), and the model is cast back."""
    from grads_ray.gradients import selfcheck

    model = _model("llama", family_dir).to(torch.bfloat16)
    real = selfcheck.compare

    def compare(engine, model, *args):
        if next(model.parameters()).dtype == torch.float32:
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 28.00 GiB")
        return real(engine, model, *args)

    monkeypatch.setattr(selfcheck, "compare", compare)
    engine, result = build_engine(model, {"engine": "batched", "proj_dim": 0, "fisher_dim": 0},
                                  synthetic_examples(VOCAB, n=2), pad_id=0)
    assert isinstance(engine, BatchedGradStats) and result.passed
    assert "out of memory" in result.float32["reason"]
    assert all(p.dtype == torch.bfloat16 for p in model.parameters())


@pytest.mark.parametrize("family", ["mixtral", "gpt_oss"])
def test_experts_through_grouped_matmul_equal_the_padded_stack(family, family_dir, monkeypatch):
    """The GPU's path for experts (``grouped_mm`` over the pairs sorted by expert, forced here on the CPU
    in float32) gives what the padded stack gives, every statistic and each weight's own moments, and
    still matches the module's own forward."""
    from grads_ray.gradients import experts as moe

    model = eager_experts(_model(family, family_dir)).float()
    batch = pad(random_examples(4, seed=5, vocab=VOCAB - 7, lo=4, hi=19), "right")
    settings = dict(proj_dim=40, proj_rank=4, seed=2, fisher_dim=0, keep_params=True)
    padded = BatchedGradStats(model, **settings)(*batch)
    monkeypatch.setattr(moe, "grouped_matmul_fits", lambda hidden, module: True)
    calls = []
    real = torch.nn.functional.grouped_mm
    monkeypatch.setattr(torch.nn.functional, "grouped_mm", lambda *a, **k: calls.append(1) or real(*a, **k))
    assert all(moe.check_equivalent(m) is None for m in model.modules() if hasattr(m, "down_proj") and m.down_proj.dim() == 3)
    grouped = BatchedGradStats(model, **settings)(*batch)
    assert calls  # the grouped kernel did run
    for key, value in padded.columns.items():
        np.testing.assert_allclose(grouped.columns[key], value, rtol=2e-5, atol=1e-7, err_msg=key)
    np.testing.assert_allclose(grouped.grad_proj, padded.grad_proj, rtol=1e-4, atol=1e-5)
    for name, m in padded.params.items():
        for k in ("s", "ss", "mx", "mn"):
            np.testing.assert_allclose(grouped.params[name][k], m[k], rtol=2e-4, atol=1e-6, err_msg=name)
