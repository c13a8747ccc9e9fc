"""The plain reference every gradient engine is checked against: float64, one example at a time,
unpadded, each parameter's whole gradient formed by autograd. Plus random padded batches to feed
the engines: variable lengths, a masked prompt of random length, left or right padding."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from grads_ray.data.formats import IGNORE_INDEX
from grads_ray.gradients.groups import group_of

STATS = ("grad_norm", "grad_mean", "grad_std", "grad_max", "grad_min")


def random_examples(n: int, seed: int, vocab: int, lo: int = 5, hi: int = 23) -> list[tuple[list[int], list[int]]]:
    """Variable-length rows with a masked prompt of random length and a response of >= 2 tokens."""
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(n):
        length = int(rng.integers(lo, hi))
        ids = rng.integers(0, vocab, size=length).tolist()
        prompt = int(rng.integers(1, length - 2))
        out.append((ids, [IGNORE_INDEX] * prompt + ids[prompt:]))
    return out


def pad(examples, side: str, pad_id: int = 0, extra: int = 3):
    """(B, T) input_ids, labels, attention_mask; ``extra`` padding beyond the longest row too."""
    width = max(len(x) for x, _ in examples) + extra
    b = len(examples)
    ids = torch.full((b, width), pad_id, dtype=torch.long)
    labels = torch.full((b, width), IGNORE_INDEX, dtype=torch.long)
    mask = torch.zeros((b, width), dtype=torch.long)
    for i, (x, y) in enumerate(examples):
        sl = slice(0, len(x)) if side == "right" else slice(width - len(x), width)
        ids[i, sl], labels[i, sl], mask[i, sl] = torch.tensor(x), torch.tensor(y), 1
    return ids, labels, mask


def reference(model64, ids: list[int], labels: list[int]) -> dict:
    """One unpadded example in float64 -> {stat columns (overall and ``<group>.<stat>``), ``loss``,
    ``grads`` (name -> whole gradient), ``hidden`` (the LM head's input (T, d))}."""
    params = [(n, p) for n, p in model64.named_parameters() if p.requires_grad]
    seen = []  # the LM head's input: the last hidden state, whatever the model's hidden_states tuple holds
    handle = model64.get_output_embeddings().register_forward_hook(lambda _m, inputs, _o: seen.append(inputs[0]))
    try:
        out = model64(input_ids=torch.tensor([ids]), attention_mask=torch.ones((1, len(ids)), dtype=torch.long),
                      use_cache=False)
    finally:
        handle.remove()
    logits = out.logits[0, :-1]
    target = torch.tensor(labels[1:])
    loss = torch.nn.functional.cross_entropy(logits, target, ignore_index=IGNORE_INDEX)
    grads = torch.autograd.grad(loss, [p for _, p in params], allow_unused=True, materialize_grads=True)
    row: dict = {"loss": loss.item(), "grads": {n: g for (n, _), g in zip(params, grads, strict=True)}}
    groups: dict[str, list[torch.Tensor]] = {}
    for (name, _), g in zip(params, grads, strict=True):
        groups.setdefault(group_of(name), []).append(g.reshape(-1))
    for prefix, vecs in [("", [g.reshape(-1) for g in grads])] + [(f"{k}.", v) for k, v in groups.items()]:
        flat = torch.cat(vecs)
        vals = {"grad_norm": flat.norm(), "grad_mean": flat.mean(), "grad_std": flat.std(unbiased=False),
                "grad_max": flat.max(), "grad_min": flat.min()}
        row.update({prefix + k: v.item() for k, v in vals.items()})
        row[prefix + "n"] = flat.numel()
    row["hidden"] = seen[-1].reshape(len(ids), -1).detach()
    return row


def scale_of(ref: dict, key: str) -> float:
    """What an error in ``key`` is relative to: its own size, floored at the RMS gradient entry of its
    group (a mean near zero has no meaningful relative error of its own)."""
    if key == "loss":
        return abs(ref[key])
    prefix = key.rsplit("grad_", 1)[0]
    rms = ref[prefix + "grad_norm"] / ref[prefix + "n"] ** 0.5
    return max(abs(ref[key]), rms)


def check_against_reference(engine, model64, examples, side: str, tol: float, **pad_kw):
    """Run ``engine`` (batched or loop) on the padded examples; every column, the projection, the
    hidden mean and the Fisher factor within ``tol`` of the reference. -> the engine's output."""
    ids, labels, mask = pad(examples, side, **pad_kw)
    out = engine(ids, labels, mask)
    worst = {}
    for i, (x, y) in enumerate(examples):
        ref = reference(model64, x, y)
        assert out.columns["n_tokens"][i] == len(x)
        assert out.columns["n_response_tokens"][i] == sum(1 for t in y[1:] if t != IGNORE_INDEX)
        keys = ["loss"] + [k for k in ref if k.split(".")[-1] in STATS]
        assert set(keys) <= set(out.columns), sorted(set(keys) - set(out.columns))
        for key in keys:
            err = abs(out.columns[key][i] - ref[key]) / scale_of(ref, key)
            worst[key] = max(worst.get(key, 0.0), err)
        if engine.projector is not None:
            want = engine.projector.project_full(ref["grads"])
            err = np.linalg.norm(out.grad_proj[i] - want.numpy()) / want.norm().item()
            worst["grad_proj"] = max(worst.get("grad_proj", 0.0), err)
        resp = torch.tensor(y) != IGNORE_INDEX
        hidden = ref["hidden"][resp].mean(0).numpy()
        worst["hidden_mean"] = max(worst.get("hidden_mean", 0.0),
                                   np.abs(out.hidden_mean[i] - hidden).max() / np.abs(hidden).max())
        if engine.fisher_rank:  # FᵀF against the best rank-r approximation of Σ z zᵀ
            predicts = torch.tensor([t != IGNORE_INDEX for t in y[1:]])
            z = ref["hidden"][:-1][predicts] @ engine.fisher_proj.T
            vals, vecs = torch.linalg.eigh(z.T @ z)
            r = engine.fisher_rank
            best = (vecs[:, -r:] * vals[-r:]) @ vecs[:, -r:].T
            f = torch.as_tensor(out.fisher_factor[i], dtype=torch.float64)
            worst["fisher"] = max(worst.get("fisher", 0.0), ((f.T @ f - best).norm() / best.norm()).item())
            assert out.fisher_energy[i] == pytest.approx((vals[-r:].sum() / vals.sum()).item(), rel=10 * tol)
    bad = {k: v for k, v in worst.items() if v > tol}
    assert not bad, bad
    return out
