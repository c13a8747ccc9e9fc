"""Nearest neighbours and near-duplicate groups over per-example vectors (numpy in, numpy out).

Vectors are centred on the corpus mean, then L2-normalised, so inner product is cosine similarity
of the centred vectors (hidden states of a language model share a large common direction that
otherwise makes every pair look alike). FAISS's exact ``IndexFlatIP``
(on a GPU when faiss-gpu and a device are present) answers k-NN in query batches; near-duplicate
groups are the connected components of the pairs at or above a cosine threshold among those
neighbours (union-find). Issue 5 adds IVF indexes and sharding for 10^7 vectors.
"""

from __future__ import annotations

import numpy as np


def faiss_module():
    """faiss, imported lazily so the package imports where it is missing."""
    try:
        import faiss
    except ImportError as exc:  # pragma: no cover - exercised only on a broken install
        raise ImportError("faiss is not installed: pip install 'grads-ray[cpu]' (or [gpu])") from exc
    return faiss


def gpu_available(faiss) -> bool:
    return hasattr(faiss, "get_num_gpus") and faiss.get_num_gpus() > 0


def l2_normalize(x: np.ndarray) -> np.ndarray:
    """Rows scaled to unit length; zero rows stay zero. (N, d) -> (N, d) float32."""
    x = np.ascontiguousarray(x, dtype=np.float32)
    norms = np.linalg.norm(x, axis=1, keepdims=True)
    return x / np.where(norms > 0, norms, 1.0)


def knn(vectors: np.ndarray, k: int, query_batch: int = 4096, use_gpu: bool | None = None,
        center: bool = True) -> tuple[np.ndarray, np.ndarray, str]:
    """Each vector's k nearest others by cosine. (N, d) -> (sims (N, k'), idx (N, k'), index name).

    k' = min(k, N - 1); the vector itself is removed from its own list. Missing slots hold -1 / -inf.
    """
    faiss = faiss_module()
    if len(vectors) < 2:  # nobody to be near
        return np.zeros((len(vectors), 0), np.float32), np.zeros((len(vectors), 0), np.int64), "none"
    x = np.asarray(vectors, dtype=np.float64)
    x = l2_normalize(x - x.mean(axis=0) if center else x)
    n, d = x.shape
    kk = min(k, max(n - 1, 0))
    index = faiss.IndexFlatIP(d)
    name = "IndexFlatIP"
    if (use_gpu is None and gpu_available(faiss)) or use_gpu:
        index = faiss.index_cpu_to_all_gpus(index)
        name += "(gpu)"
    index.add(x)
    sims = np.full((n, kk), -np.inf, dtype=np.float32)
    idx = np.full((n, kk), -1, dtype=np.int64)
    for start in range(0, n, query_batch):
        q = x[start:start + query_batch]
        s, i = index.search(q, kk + 1)  # (b, kk+1): usually self first
        rows = np.arange(start, start + len(q))[:, None]
        not_self = i != rows
        for r in range(len(q)):
            keep_i, keep_s = i[r][not_self[r]][:kk], s[r][not_self[r]][:kk]
            idx[start + r, :len(keep_i)] = keep_i
            sims[start + r, :len(keep_s)] = keep_s
    return sims, idx, name


def union_find_groups(n: int, pairs_a: np.ndarray, pairs_b: np.ndarray) -> np.ndarray:
    """Connected components of an undirected graph on n nodes. -> (n,) group id = smallest member."""
    parent = np.arange(n)

    def find(a: int) -> int:
        root = a
        while parent[root] != root:
            root = parent[root]
        while parent[a] != root:  # path compression
            parent[a], a = root, parent[a]
        return root

    for a, b in zip(pairs_a.tolist(), pairs_b.tolist(), strict=True):
        ra, rb = find(a), find(b)
        if ra != rb:
            parent[max(ra, rb)] = min(ra, rb)
    return np.array([find(a) for a in range(n)], dtype=np.int64)


def duplicate_groups(sims: np.ndarray, idx: np.ndarray, threshold: float) -> np.ndarray:
    """Near-duplicate group of each vector from its neighbour lists. -> (N,) int64 group ids."""
    rows, cols = np.nonzero((sims >= threshold) & (idx >= 0))
    return union_find_groups(sims.shape[0], rows, idx[rows, cols])


def diversity(sims: np.ndarray) -> np.ndarray:
    """1 - mean cosine similarity to the k nearest neighbours, in [0, 2]; high = in a sparse region."""
    valid = np.isfinite(sims)
    mean = np.where(valid, sims, 0).sum(1) / np.maximum(valid.sum(1), 1)
    return (1.0 - mean).astype(np.float32)


def auto_clusters(n: int) -> int:
    """The default number of k-means clusters: about √N, at most 1024, at least 1."""
    return int(min(1024, max(1, round(n ** 0.5))))


def kmeans_clusters(vectors: np.ndarray, k: int, seed: int, use_gpu: bool | None = None, niter: int = 20,
                    center: bool = True) -> tuple[np.ndarray, np.ndarray]:
    """Spherical k-means (FAISS) of the centred, L2-normalised vectors; FAISS trains on at most 256
    points per centroid (a seeded sample) and every vector is then assigned to its nearest centroid.
    (N, d) -> ((N,) int64 cluster ids in [0, k'), (k', d) float32 centroids), k' = min(k, N)."""
    faiss = faiss_module()
    n = len(vectors)
    if n == 0 or k <= 1:
        return np.zeros(n, np.int64), np.zeros((min(n, 1), vectors.shape[1] if vectors.ndim == 2 else 1), np.float32)
    x = np.asarray(vectors, dtype=np.float64)
    x = l2_normalize(x - x.mean(axis=0) if center else x)
    k = min(k, n)
    gpu = bool((use_gpu is None and gpu_available(faiss)) or use_gpu)
    km = faiss.Kmeans(x.shape[1], k, niter=niter, seed=seed, spherical=True, gpu=gpu, verbose=False)
    km.train(x)
    _, assign = km.index.search(x, 1)
    return assign[:, 0].astype(np.int64), km.centroids
