"""The score stage's statistics against a plain reference: float64, one example at a time, the whole
gradient flattened into one vector. Padding (left and right), prompt masking, odd lengths, batch > 1."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch

from grads_ray.data.formats import IGNORE_INDEX
from grads_ray.gradients.groups import GRAD_STATS, group_of
from grads_ray.gradients.stats import batch_stats
from tests.conftest import VOCAB, save_tiny_model

ARCHS = ["llama", "qwen2", "gpt2"]


def random_examples(n: int, seed: int) -> list[tuple[list[int], list[int]]]:
    """Variable-length rows with a masked prompt of random length and a response of >= 2 tokens."""
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(n):
        length = int(rng.integers(5, 23))
        ids = rng.integers(0, VOCAB, size=length).tolist()
        prompt = int(rng.integers(1, length - 2))
        out.append((ids, [IGNORE_INDEX] * prompt + ids[prompt:]))
    return out


def pad(examples, side: str, pad_id: int = 0):
    width = max(len(x) for x, _ in examples) + 3  # extra padding beyond the longest row too
    b = len(examples)
    ids = torch.full((b, width), pad_id, dtype=torch.long)
    labels = torch.full((b, width), IGNORE_INDEX, dtype=torch.long)
    mask = torch.zeros((b, width), dtype=torch.long)
    for i, (x, y) in enumerate(examples):
        sl = slice(0, len(x)) if side == "right" else slice(width - len(x), width)
        ids[i, sl], labels[i, sl], mask[i, sl] = torch.tensor(x), torch.tensor(y), 1
    return ids, labels, mask


def reference(model64, ids: list[int], labels: list[int]) -> dict[str, float]:
    """Float64, one example, whole gradient as one flat vector: the definition of each statistic."""
    params = [(n, p) for n, p in model64.named_parameters() if p.requires_grad]
    out = model64(input_ids=torch.tensor([ids]), output_hidden_states=True)
    logits = out.logits[0, :-1]
    target = torch.tensor(labels[1:])
    loss = torch.nn.functional.cross_entropy(logits, target, ignore_index=IGNORE_INDEX)
    grads = torch.autograd.grad(loss, [p for _, p in params])
    row = {"loss": loss.item()}
    groups: dict[str, list[torch.Tensor]] = {}
    for (name, _), g in zip(params, grads, strict=True):
        groups.setdefault(group_of(name), []).append(g.reshape(-1))
    for prefix, vecs in [("", [g.reshape(-1) for g in grads])] + [(f"{k}.", v) for k, v in groups.items()]:
        flat = torch.cat(vecs)
        vals = {"grad_norm": flat.norm(), "grad_mean": flat.mean(), "grad_std": flat.std(unbiased=False),
                "grad_max": flat.max(), "grad_min": flat.min()}
        row.update({prefix + k: v.item() for k, v in vals.items()})
    mask = torch.tensor(labels) != IGNORE_INDEX
    row["hidden"] = out.hidden_states[-1][0][mask].mean(0).detach().numpy()
    return row


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
        keys = [k for k in ref if k != "hidden"]
        assert set(keys) <= set(rows[i]), sorted(set(keys) - set(rows[i]))
        for key in keys:
            scale = max(abs(ref[key]), 1e-3 * abs(ref["grad_norm"]))  # mean ~ 0 needs an absolute floor
            assert abs(rows[i][key] - ref[key]) <= 1e-4 * scale, (arch, side, i, key, rows[i][key], ref[key])
        np.testing.assert_allclose(feats[i], ref["hidden"], rtol=1e-4, atol=1e-5)


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
