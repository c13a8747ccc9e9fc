"""k-NN and near-duplicate groups against brute force on random vectors."""

from __future__ import annotations

import numpy as np
import pytest

from grads_ray.similarity.index import (
    IndexSpec,
    _drop_self,
    diversity,
    duplicate_groups,
    knn,
    l2_normalize,
    recall_at_k,
    union_find_groups,
)


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


def _clustered(n: int, d: int, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    centres = rng.normal(size=(20, d))
    return (centres[rng.integers(0, 20, n)] + 0.5 * rng.normal(size=(n, d))).astype(np.float32)


def test_drop_self_by_hand():
    sims = np.array([[0.9, 0.8, 0.7], [0.95, 0.9, 0.1], [0.5, 0.4, 0.0]])
    idx = np.array([[4, 0, 2], [3, 8, 1], [7, -1, -1]])
    s, i = _drop_self(sims, idx, np.array([0, 1, 2]), 2)
    assert i.tolist() == [[4, 2], [3, 8], [7, -1]]  # row 0 loses itself, row 1 its last, row 2 keeps its gap
    np.testing.assert_allclose(s, [[0.9, 0.7], [0.95, 0.9], [0.5, -np.inf]], rtol=1e-6)


def test_index_spec_resolves_by_size():
    spec = IndexSpec(exact_max=1000)
    assert spec.resolve(1000, 64) == ("flat", "Flat")
    assert spec.resolve(10_000, 64) == ("ivf_flat", "IVF256,Flat")  # about 4·√N cells, ≥ 39 points each
    assert IndexSpec(kind="ivf_pq", pq_m=32).resolve(10_000, 48) == ("ivf_pq", "IVF256,PQ24")  # m | d


def test_ivf_search_and_its_measured_recall():
    x = _clustered(4000, 24, 0)
    ref_s, ref_i = brute_knn(x, 8, True)
    # every cell probed: IVF is exact
    sims, idx, name = knn(x, 8, spec=IndexSpec(kind="ivf_flat", nlist=16, nprobe=16))
    assert name.startswith("IndexIVFFlat(IVF16,Flat")
    assert (idx == ref_i).mean() > 0.99 and recall_at_k(x, idx, sample=500) > 0.99
    # one cell of 64: misses some, and recall_at_k says how many, as brute force counts them
    sims, idx, _ = knn(x, 8, spec=IndexSpec(kind="ivf_flat", nlist=64, nprobe=1))
    rows = np.sort(np.random.default_rng(0).choice(4000, 500, replace=False))
    direct = np.mean([len(np.intersect1d(idx[r], ref_i[r])) / 8 for r in rows])
    measured = recall_at_k(x, idx, sample=500, seed=0)
    assert measured < 0.99 and measured == pytest.approx(direct, abs=1e-9)
    _, idx_pq, name = knn(x, 8, spec=IndexSpec(kind="ivf_pq", nlist=16, nprobe=16, pq_m=8))
    assert "PQ8" in name and recall_at_k(x, idx_pq, sample=500) > 0.3  # 8 bytes a vector: lossy


def test_components_match_a_plain_union_find():
    rng = np.random.default_rng(3)
    n = 400
    a, b = rng.integers(0, n, 300), rng.integers(0, n, 300)
    parent = list(range(n))

    def find(v):
        while parent[v] != v:
            v = parent[v]
        return v

    for u, v in zip(a.tolist(), b.tolist(), strict=True):
        ru, rv = find(u), find(v)
        parent[max(ru, rv)] = min(ru, rv)
    expected = [min(j for j in range(n) if find(j) == find(i)) for i in range(n)]
    assert union_find_groups(n, a, b).tolist() == expected


def test_greedy_far_apart_equals_one_at_a_time():
    from grads_ray.similarity.index import greedy_far_apart

    rng = np.random.default_rng(4)
    base = rng.normal(size=(60, 8))
    x = np.concatenate([base, base[:25] + 0.05 * rng.normal(size=(25, 8))])  # near copies
    x = l2_normalize(x - x.mean(0))
    order = rng.permutation(len(x))
    kept: list[int] = []
    for i in order.tolist():  # the plain reference
        if not kept or (x[kept] @ x[i]).max() <= 0.9:
            kept.append(i)
    for block in (1, 7, 512):  # across blocks, inside a block, both
        acc, rej, seen = greedy_far_apart(order, x, 0.9, lambda a: False, block=block)
        assert acc.tolist() == kept and sorted(rej.tolist() + kept) == sorted(order.tolist()) and seen == len(x)
    acc, _, seen = greedy_far_apart(order, x, 0.9, lambda a: len(a) >= 10, block=7)
    assert acc.tolist() == kept[:len(acc)] and len(acc) >= 10 and seen < len(x)  # stops once done


def test_rows_that_are_not_finite_count_as_zero_vectors():
    from grads_ray.similarity.index import unit_vectors, zero_nonfinite

    x = np.arange(12, dtype=np.float32).reshape(4, 3) + 1
    x[1, 2] = np.nan
    x[3, 0] = np.inf
    z = zero_nonfinite(x.copy())
    assert (z[[1, 3]] == 0).all() and (z[[0, 2]] == x[[0, 2]]).all()
    u = unit_vectors(x, center=True)
    assert np.isfinite(u).all()
    np.testing.assert_allclose(u, unit_vectors(z, center=True))
