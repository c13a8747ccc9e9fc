"""The per-example loop engine (the benchmarks' baseline, ``scoring.engine=loop``) against the plain
reference: float64, one example at a time, the whole gradient flattened into one vector. Padding (left and right), prompt masking, odd lengths, batch > 1."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch

from grads_ray.data.formats import IGNORE_INDEX
from grads_ray.gradients.groups import GRAD_STATS, group_of
from grads_ray.gradients.stats import batch_stats
from tests.conftest import VOCAB, save_tiny_model
from tests.reference import pad, reference
from tests.reference import random_examples as _random_examples

ARCHS = ["llama", "qwen2", "gpt2"]


def random_examples(n: int, seed: int):
    return _random_examples(n, seed, VOCAB)


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("side", ["right", "left"])
def test_batch_stats_match_float64_reference(arch, side, tmp_path):
    model = save_tiny_model(arch, tmp_path / arch).eval()
    model64 = copy.deepcopy(model).double()
    examples = random_examples(5, seed=hash((arch, side)) % 1000)
    ids, labels, mask = pad(examples, side)
    rows, feats = batch_stats(model, ids, labels, mask)
    assert len(rows) == len(examples) and feats.shape == (len(examples), model.config.hidden_size)
    for i, (x, y) in enumerate(examples):
        ref = reference(model64, x, y)
        assert rows[i]["n_tokens"] == len(x)
        assert rows[i]["n_response_tokens"] == sum(1 for t in y[1:] if t != IGNORE_INDEX)
        keys = [k for k in ref if k not in ("hidden", "grads", "n") and not k.endswith(".n")]
        assert set(keys) <= set(rows[i]), sorted(set(keys) - set(rows[i]))
        for key in keys:
            scale = max(abs(ref[key]), 1e-3 * abs(ref["grad_norm"]))  # mean ~ 0 needs an absolute floor
            assert abs(rows[i][key] - ref[key]) <= 1e-4 * scale, (arch, side, i, key, rows[i][key], ref[key])
        hidden = ref["hidden"][torch.tensor(y) != IGNORE_INDEX].mean(0).numpy()
        np.testing.assert_allclose(feats[i], hidden, rtol=1e-4, atol=1e-5)


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
    model = save_tiny_model("llama", tmp_path / "m").eval()
    ex = random_examples(2, seed=3)
    alone, _ = batch_stats(model, *pad(ex[:1], "right"))
    together, _ = batch_stats(model, *pad(ex, "left"))
    for stat in ("loss",) + GRAD_STATS:
        assert together[0][stat] == pytest.approx(alone[0][stat], rel=1e-5, abs=1e-9)
