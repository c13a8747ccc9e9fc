"""Nearest neighbours, near-duplicate groups and clusters over per-example vectors (numpy in, numpy out).

Vectors are centred on the corpus mean, then L2-normalised, so inner product is cosine similarity
of the centred vectors (hidden states of a language model share a large common direction that
otherwise makes every pair look alike). A FAISS index (:class:`IndexSpec`: exact ``IndexFlatIP`` up
to a size, IVF-Flat or IVF-PQ above it; on the GPUs when faiss-gpu and a device are present) answers
k-NN in query batches; an approximate index's recall@k is measured on a sample against an exact
search. Near-duplicate groups are the connected components of the neighbour pairs at or above a
cosine threshold; clusters come from spherical k-means.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import numpy as np


def faiss_module():
    """faiss, imported lazily so the package imports where it is missing."""
    try:
        import faiss
    except ImportError as exc:  # pragma: no cover - exercised only on a broken install
        raise ImportError("faiss is not installed: pip install 'grads-ray[cpu]' (or [gpu])") from exc
    return faiss


_GPU_CHECKED: dict[int, str | None] = {}  # per process and faiss module: None = searches on the GPU


def gpu_problem(faiss) -> str | None:
    """Why FAISS cannot search on a GPU in this process, or None when it can: no GPU build, no GPU
    visible, or a tiny exact search on GPU 0 that fails or differs from the CPU's (a FAISS without
    code for the device's architecture, e.g. ``faiss-gpu-cu12`` 1.14 on Hopper, fails there, deep in
    its first kernel). Checked once a process; the first failure is logged as a warning."""
    key = id(faiss)
    if key not in _GPU_CHECKED:
        _GPU_CHECKED[key] = why = _check_gpu(faiss)
        if why and sees_gpu(faiss):
            logging.getLogger(__name__).warning("grads-ray: %s; the similarity index runs on the CPU", why)
    return _GPU_CHECKED[key]


def sees_gpu(faiss) -> bool:
    """A FAISS GPU build that sees at least one GPU here (whether it can search on it: gpu_problem)."""
    return hasattr(faiss, "StandardGpuResources") and faiss.get_num_gpus() > 0


def _check_gpu(faiss) -> str | None:
    if not hasattr(faiss, "StandardGpuResources"):
        return f"FAISS {getattr(faiss, '__version__', '?')} is a CPU build (faiss-gpu is not installed)"
    if not sees_gpu(faiss):
        return "FAISS sees no GPU"
    try:
        x = np.random.default_rng(0).standard_normal((64, 16)).astype(np.float32)
        cpu = faiss.IndexFlatIP(16)
        cpu.add(x)
        gpu = faiss.index_cpu_to_gpu(faiss.StandardGpuResources(), 0, cpu)
        sims, idx = gpu.search(x[:8], 4)
        want_sims, want_idx = cpu.search(x[:8], 4)
        if not np.allclose(sims, want_sims, rtol=1e-3, atol=1e-3) or (idx[:, 0] != want_idx[:, 0]).any():
            return f"FAISS {faiss.__version__}'s GPU search differs from its CPU search on {_device_name()}"
    except Exception as exc:  # noqa: BLE001 - whatever FAISS raises for a kernel it does not have
        first = str(exc).strip().splitlines()[-1] if str(exc).strip() else type(exc).__name__
        return f"FAISS {faiss.__version__} cannot search on {_device_name()} ({type(exc).__name__}: {first[:200]})"
    return None


def _device_name() -> str:
    """GPU 0 and its compute capability, as torch sees them (for messages)."""
    try:
        import torch

        if torch.cuda.is_available():
            major, minor = torch.cuda.get_device_capability(0)
            return f"{torch.cuda.get_device_name(0)} (sm_{major}{minor})"
    except Exception:  # noqa: BLE001 - only for a message
        pass
    return "GPU 0"


def gpu_available(faiss) -> bool:
    """Whether FAISS searches on a GPU here (:func:`gpu_problem` is None)."""
    return gpu_problem(faiss) is None


def use_gpu_index(faiss, requested: bool | None) -> bool:
    """Whether to put an index on the GPUs: asked (True), or by default (None) where one works; never
    where FAISS cannot search on one (:func:`gpu_problem`), so a FAISS without code for the device
    falls back to the CPU with a warning instead of failing inside a worker."""
    return requested is not False and gpu_available(faiss)


def l2_normalize(x: np.ndarray) -> np.ndarray:
    """Rows scaled to unit length; zero rows stay zero. (N, d) -> (N, d) float32."""
    x = np.ascontiguousarray(x, dtype=np.float32)
    norms = np.linalg.norm(x, axis=1, keepdims=True)
    return x / np.where(norms > 0, norms, 1.0)


def zero_nonfinite(x: np.ndarray) -> np.ndarray:
    """Rows holding a NaN or an infinity set to zero (in place when writable): a broken example's
    features must not poison the mean or the index. (N, d) -> (N, d)."""
    bad = ~np.isfinite(x).all(axis=1) if x.ndim == 2 and x.size else np.zeros(len(x), bool)
    if bad.any():
        x = x if x.flags.writeable else x.copy()
        x[bad] = 0
    return x


def unit_vectors(vectors: np.ndarray, center: bool = True) -> np.ndarray:
    """The vectors every search here compares: centred on their mean (in float64) when asked, then
    L2-normalised; rows that are not finite count as zero. (N, d) -> (N, d) float32."""
    x = zero_nonfinite(np.asarray(vectors, dtype=np.float64))
    return l2_normalize(x - x.mean(axis=0) if center else x)


@dataclass
class IndexSpec:
    """Which FAISS index answers k-NN (docs/similarity in docs/grads.md and README).

    ``kind``: ``flat`` (exact inner product), ``ivf_flat`` / ``ivf_pq`` (inverted lists over
    ``nlist`` k-means cells, trained on a seeded sample of ``train_size`` vectors; ``nprobe`` cells
    searched per query; PQ stores ``pq_m`` bytes per vector), or ``auto``: flat up to ``exact_max``
    vectors, else ivf_flat. ``nlist`` 0 = auto, about 4·√N.
    """

    kind: str = "auto"
    exact_max: int = 200_000
    nlist: int = 0
    nprobe: int = 32
    pq_m: int = 32
    train_size: int = 100_000
    seed: int = 0

    def resolve(self, n: int, d: int) -> tuple[str, str]:
        """-> (kind, FAISS factory string) for n vectors of dimension d."""
        kind = ("flat" if n <= self.exact_max else "ivf_flat") if self.kind == "auto" else self.kind
        if kind == "flat":
            return kind, "Flat"
        nlist = self.nlist or int(min(65536, max(1, round(4 * n ** 0.5))))
        nlist = max(1, min(nlist, n // 39 if n >= 39 else 1))  # FAISS wants ~39 training points a cell
        if kind == "ivf_flat":
            return kind, f"IVF{nlist},Flat"
        if kind == "ivf_pq":
            m = self.pq_m
            while d % m:  # PQ needs m | d
                m -= 1
            return kind, f"IVF{nlist},PQ{m}"
        raise ValueError(f"unknown index kind {self.kind!r}: auto, flat, ivf_flat or ivf_pq")


def trained_index(sample: np.ndarray, n: int, d: int, spec: IndexSpec):
    """An empty inner-product index for n vectors of dimension d, its quantiser (IVF) trained on
    ``sample`` (unit rows) and nprobe set. -> (index, kind, name)."""
    faiss = faiss_module()
    kind, factory = spec.resolve(n, d)
    index = faiss.index_factory(d, factory, faiss.METRIC_INNER_PRODUCT)
    if kind != "flat":
        index.train(np.ascontiguousarray(sample, np.float32))
        ivf = faiss.extract_index_ivf(index)
        ivf.nprobe = min(spec.nprobe, ivf.nlist)
    name = "IndexFlatIP" if kind == "flat" else f"{type(index).__name__}({factory}, nprobe={spec.nprobe})"
    return index, kind, name


def build_index(x: np.ndarray, spec: IndexSpec, use_gpu: bool | None = None):
    """A trained, filled inner-product index over the rows of x (N, d) float32. -> (index, name)."""
    faiss = faiss_module()
    n, d = x.shape
    sample = x
    if n > spec.train_size and spec.resolve(n, d)[0] != "flat":
        sample = x[np.sort(np.random.default_rng(spec.seed).choice(n, spec.train_size, replace=False))]
    index, _, name = trained_index(sample, n, d, spec)
    if use_gpu_index(faiss, use_gpu):
        index = faiss.index_cpu_to_all_gpus(index)
        name += "(gpu)"
    index.add(x)
    return index, name


def _drop_self(sims: np.ndarray, idx: np.ndarray, rows: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Remove each query's own row from its k+1 results (where present; else drop the last), keeping
    the rest in order. Missing results (FAISS's -1) get sim -inf. (b, k+1) -> (b, k)."""
    not_self = idx != rows[:, None]
    order = np.argsort(~not_self, axis=1, kind="stable")[:, :k]  # self, if any, sorts last
    idx = np.take_along_axis(idx, order, 1)
    sims = np.take_along_axis(sims, order, 1).astype(np.float32)
    sims[idx < 0] = -np.inf
    return sims, idx


def knn(vectors: np.ndarray, k: int, query_batch: int = 4096, use_gpu: bool | None = None,
        center: bool = True, spec: IndexSpec | None = None) -> tuple[np.ndarray, np.ndarray, str]:
    """Each vector's k nearest others by cosine. (N, d) -> (sims (N, k'), idx (N, k'), index name).

    k' = min(k, N - 1); the vector itself is removed from its own list. Missing slots hold -1 / -inf
    (an IVF search can return fewer than k). ``spec`` picks the index (default: exact).
    """
    if len(vectors) < 2:  # nobody to be near
        return np.zeros((len(vectors), 0), np.float32), np.zeros((len(vectors), 0), np.int64), "none"
    x = unit_vectors(vectors, center)
    n = len(x)
    kk = min(k, n - 1)
    index, name = build_index(x, spec or IndexSpec(kind="flat"), use_gpu)
    sims = np.empty((n, kk), dtype=np.float32)
    idx = np.empty((n, kk), dtype=np.int64)
    for start in range(0, n, query_batch):
        q = x[start:start + query_batch]
        s, i = index.search(q, kk + 1)  # usually self first
        sims[start:start + len(q)], idx[start:start + len(q)] = _drop_self(s, i, np.arange(start, start + len(q)), kk)
    return sims, idx, name


def recall_at_k(vectors: np.ndarray, idx: np.ndarray, sample: int = 1000, seed: int = 0,
                center: bool = True) -> float:
    """Share of the exact k nearest neighbours that ``idx`` (from an approximate index) found, on a
    seeded sample of queries, the exact ones by a flat search. (N, d), (N, k) -> recall in [0, 1]."""
    n, k = idx.shape
    if n < 2 or k == 0:
        return 1.0
    rows = np.sort(np.random.default_rng(seed).choice(n, min(sample, n), replace=False))
    x = unit_vectors(vectors, center)
    exact, _ = build_index(x, IndexSpec(kind="flat"), use_gpu=False)
    s, i = exact.search(x[rows], k + 1)
    _, truth = _drop_self(s, i, rows, k)
    found = sum(len(np.intersect1d(a[a >= 0], b[b >= 0])) for a, b in zip(idx[rows], truth, strict=True))
    return found / max(int((truth >= 0).sum()), 1)


def union_find_groups(n: int, pairs_a: np.ndarray, pairs_b: np.ndarray) -> np.ndarray:
    """Connected components of an undirected graph on n nodes (scipy's, in C). -> (n,) group id =
    the smallest member's index."""
    from scipy.sparse import coo_matrix
    from scipy.sparse.csgraph import connected_components

    if n == 0:
        return np.zeros(0, np.int64)
    a, b = np.asarray(pairs_a, np.int64), np.asarray(pairs_b, np.int64)
    graph = coo_matrix((np.ones(len(a), np.int8), (a, b)), shape=(n, n))
    _, label = connected_components(graph, directed=False)
    smallest = np.full(label.max() + 1, n, np.int64)
    np.minimum.at(smallest, label, np.arange(n))
    return smallest[label]


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


def kmeans_centroids(unit: np.ndarray, k: int, seed: int, use_gpu: bool | None = None, niter: int = 20) -> np.ndarray:
    """Spherical k-means (FAISS) of unit rows; FAISS trains on at most 256 points a centroid (its
    seeded sample). (N, d) -> (k', d) float32 centroids, k' = min(k, N)."""
    faiss = faiss_module()
    gpu = use_gpu_index(faiss, use_gpu)
    km = faiss.Kmeans(unit.shape[1], min(k, len(unit)), niter=niter, seed=seed, spherical=True, gpu=gpu,
                      verbose=False)
    km.train(np.ascontiguousarray(unit, np.float32))
    return km.centroids


def greedy_far_apart(order: np.ndarray, vectors: np.ndarray, threshold: float, done, block: int = 2048,
                     use_gpu: bool | None = None) -> tuple[np.ndarray, np.ndarray, int]:
    """Walk ``order`` (best first) and reject each candidate whose cosine to a candidate accepted
    before it exceeds ``threshold``: against earlier blocks by one batched FAISS search (an exact
    index of the accepted), inside a block by its (b, b) similarity matrix.

    ``vectors`` (N, d) must be centred and L2-normalised; ``done(accepted)`` says when enough has
    been accepted (e.g. the budget is spent), so the walk stops early. -> (accepted indices in
    order, rejected indices, how many of ``order`` were examined)."""
    faiss = faiss_module()
    x = np.ascontiguousarray(vectors, dtype=np.float32)
    index = faiss.IndexFlatIP(x.shape[1])
    if use_gpu_index(faiss, use_gpu):
        index = faiss.index_cpu_to_all_gpus(index)
    accepted: list[np.ndarray] = []
    rejected: list[np.ndarray] = []
    pos = 0
    while pos < len(order):
        cand = order[pos:pos + block]
        pos += len(cand)
        q = x[cand]
        far = np.ones(len(cand), bool)
        if index.ntotal:
            s, _ = index.search(q, 1)
            far = s[:, 0] <= threshold
        inner = q @ q.T
        keep = np.zeros(len(cand), bool)
        for j in np.flatnonzero(far).tolist():  # inside the block, in order
            if not (inner[j, :j][keep[:j]] > threshold).any():
                keep[j] = True
        accepted.append(cand[keep])
        rejected.append(cand[~keep])
        index.add(q[keep])
        if done(np.concatenate(accepted)):
            break
    cat = lambda parts: np.concatenate(parts) if parts else np.zeros(0, np.int64)  # noqa: E731
    return cat(accepted), cat(rejected), pos
