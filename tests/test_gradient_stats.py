"""The per-example loop engine (the benchmarks' baseline, ``scoring.engine=loop``) against the plain
reference: float64, one example at a time, the whole gradient flattened into one vector. Padding (left and right), prompt masking, odd lengths, batch > 1."""

from __future__ import annotations

import copy

import numpy as np
import pytest

from grads_ray.gradients.engine import BatchedGradStats
from grads_ray.gradients.groups import GRAD_STATS, group_of
from grads_ray.gradients.stats import LoopGradStats
from tests.conftest import VOCAB, save_tiny_model
from tests.reference import check_against_reference, pad
from tests.reference import random_examples as _random_examples

ARCHS = ["llama", "qwen2", "gpt2"]


def random_examples(n: int, seed: int):
    return _random_examples(n, seed, VOCAB)


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("side", ["right", "left"])
def test_loop_engine_matches_float64_reference(arch, side, tmp_path):
    model = save_tiny_model(arch, tmp_path / arch).eval()
    model64 = copy.deepcopy(model).double()
    examples = random_examples(5, seed=len(arch) * 3 + (side == "left"))
    engine = LoopGradStats(model, proj_dim=24, proj_rank=3, fisher_dim=8, fisher_rank=2)
    out = check_against_reference(engine, model64, examples, side, 1e-3)
    assert out.hidden_mean.shape == (5, model.config.hidden_size) and out.grad_proj.shape == (5, 24)


@pytest.mark.parametrize("arch", ARCHS)
def test_loop_and_batched_engines_agree(arch, tmp_path):
    """Same columns, same projection, same features: either engine can stand behind the score stage."""
    model64 = save_tiny_model(arch, tmp_path / arch).eval().double()
    batch = pad(random_examples(4, seed=7), "left")
    kw = {"proj_dim": 32, "proj_rank": 4, "seed": 3, "fisher_dim": 8, "fisher_rank": 2}
    loop, fast = LoopGradStats(model64, **kw)(*batch), BatchedGradStats(model64, **kw)(*batch)
    assert set(loop.columns) == set(fast.columns)
    for key, value in loop.columns.items():
        np.testing.assert_allclose(fast.columns[key], value, rtol=1e-9, atol=1e-12, err_msg=key)
    np.testing.assert_allclose(fast.grad_proj, loop.grad_proj, rtol=1e-5, atol=1e-7)
    np.testing.assert_allclose(fast.hidden_mean, loop.hidden_mean, rtol=1e-5, atol=1e-7)
    np.testing.assert_allclose(fast.fisher_energy, loop.fisher_energy, rtol=1e-9)


def test_every_parameter_has_a_named_group(tmp_path):
    for arch in ARCHS:
        model = save_tiny_model(arch, tmp_path / arch)
        groups = {group_of(n) for n, _ in model.named_parameters()}
        assert "other" not in groups and not any(g.endswith(".other") for g in groups), (arch, groups)
        assert {"embedding", "norm", "layer0.attn", "layer1.mlp"} <= groups
        if arch != "gpt2":  # GPT-2 ties the head to the embedding: one parameter, counted once
            assert "head" in groups


def test_statistics_ignore_padding_tokens(tmp_path):
    """The same example alone and beside a longer padded one gives the same numbers."""
    model = save_tiny_model("gpt2", tmp_path / "m").eval()  # learned positions: padding must not shift them
    ex = random_examples(2, seed=3)
    for engine in (LoopGradStats(model), BatchedGradStats(model)):
        alone = engine(*pad(ex[:1], "right")).row(0)
        together = engine(*pad(ex, "left", extra=5)).row(0)
        for stat in ("loss",) + GRAD_STATS:
            assert together[stat] == pytest.approx(alone[stat], rel=1e-5, abs=1e-9), (type(engine), stat)


def test_the_stats_flag_rows_that_are_not_finite():
    import pyarrow as pa

    from grads_ray.gradients.scorer import finite_rows

    table = pa.table({"id": ["a", "b", "c", "d", "e"], "n_tokens": [3, 4, 5, 6, 7],
                      "loss": [1.0, float("nan"), 2.0, 2.0, 2.0], "grad_norm": [1.0, 1.0, float("inf"), 1.0, 1.0],
                      "head.grad_min": [0.0, 0.0, 0.0, -float("inf"), 0.0],
                      "loss_response_only": [float("nan")] * 5})  # NaN by design when not computed
    assert finite_rows(table).tolist() == [True, False, False, False, True]
