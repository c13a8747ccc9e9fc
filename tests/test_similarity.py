"""k-NN and near-duplicate groups against brute force on random vectors."""

from __future__ import annotations

import numpy as np

from grads_ray.similarity.index import diversity, duplicate_groups, knn, l2_normalize, union_find_groups


def brute_knn(x: np.ndarray, k: int, center: bool = True):
    x = x.astype(np.float64)
    x = x - x.mean(0) if center else x
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    sims = x @ x.T
    np.fill_diagonal(sims, -np.inf)
    idx = np.argsort(-sims, axis=1, kind="stable")[:, :k]
    return np.take_along_axis(sims, idx, 1), idx


def test_knn_matches_brute_force():
    rng = np.random.default_rng(0)
    x = rng.normal(size=(300, 12)).astype(np.float32)
    for center in (True, False):
        sims, idx, name = knn(x, 7, query_batch=64, center=center)
        ref_s, ref_i = brute_knn(x, 7, center)
        assert name.startswith("IndexFlatIP") and sims.shape == (300, 7)
        np.testing.assert_allclose(sims, ref_s, atol=1e-5)
        assert (idx == ref_i).mean() > 0.99  # ties aside, the same neighbours
        assert not (idx == np.arange(300)[:, None]).any()  # never itself


def test_knn_with_fewer_vectors_than_k():
    sims, idx, _ = knn(np.eye(3, dtype=np.float32), 10)
    assert sims.shape == (3, 2) and (idx >= 0).all()
    for n in (0, 1):
        sims, idx, name = knn(np.ones((n, 4), dtype=np.float32), 10)
        assert sims.shape == idx.shape == (n, 0) and name == "none"
        assert duplicate_groups(sims, idx, 0.9).tolist() == list(range(n))


def test_union_find_matches_components():
    a, b = np.array([0, 2, 5, 6]), np.array([1, 3, 6, 7])
    groups = union_find_groups(9, a, b)
    assert groups.tolist() == [0, 0, 2, 2, 4, 5, 5, 5, 8]


def test_planted_duplicates_are_grouped():
    rng = np.random.default_rng(1)
    base = rng.normal(size=(50, 16))
    x = np.concatenate([base, base[:5] + 1e-4 * rng.normal(size=(5, 16)), base[:2] * 3.0])
    sims, idx, _ = knn(x.astype(np.float32), 5, center=False)
    groups = duplicate_groups(sims, idx, 0.999)
    for i in range(5):
        assert groups[50 + i] == groups[i]
    assert groups[55] == groups[0] == groups[50] and groups[56] == groups[1]  # scaled copies: cosine 1
    assert len(set(groups[5:50].tolist())) == 45  # the rest are alone


def test_diversity_is_one_minus_mean_similarity():
    sims = np.array([[0.5, 0.3], [1.0, -np.inf]], dtype=np.float32)
    np.testing.assert_allclose(diversity(sims), [0.6, 0.0])
    np.testing.assert_allclose(np.linalg.norm(l2_normalize(np.array([[3.0, 4.0], [0, 0]])), axis=1), [1, 0])
