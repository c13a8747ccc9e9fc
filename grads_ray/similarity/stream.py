"""The similarity stage over vectors that need not fit in the driver: read shard by shard, indexed by
workers (Ray actors, one GPU each when present), their k-NN merged.

The driver holds one chunk of vectors at a time (``similarity.memory_mb`` sets its rows), plus
per-example arrays of a few bytes (positions, clusters, near-duplicate pairs) and a training sample
of at most ``train_size`` vectors. The vectors themselves live in the workers' indexes: each worker
holds the rows it was given, all from one trained template, so an exact index merged over workers
is exact, and an IVF one searches the same cells it would as a single index.

Four passes over the feature parts (docs/design.md, similarity):

0. ids -> each row's position in id order (the select stage's order; ``nn_rows`` are positions);
1. the mean (for centring) and a seeded sample by position (IVF training, k-means, recall queries);
2. centred, unit rows to the workers (balanced by rows), cluster of each row, and the sample's exact
   neighbours by a streamed brute force (for the recall of an approximate index);
3. each chunk searched on every worker, merged top-k, self removed; pairs at or above the
   threshold; one output part per chunk; then the components (near-duplicate groups) are added.

The results equal :func:`grads_ray.similarity.index.knn` on the whole matrix (ties aside), for any
number of workers, chunks and shards (tests/test_similarity_stream.py).
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from grads_ray import storage
from grads_ray.columns import id_positions, lists, matrix
from grads_ray.rundir import LEDGER, write_json, write_parquet
from grads_ray.similarity.index import (
    IndexSpec,
    _drop_self,
    auto_clusters,
    diversity,
    faiss_module,
    gpu_problem,
    kmeans_centroids,
    l2_normalize,
    trained_index,
    union_find_groups,
    use_gpu_index,
    zero_nonfinite,
)

log = logging.getLogger(__name__)


def merge_topk(sims: np.ndarray, labels: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """The k best of each row's candidates from several searches, highest similarity first, ties by
    the smaller label; missing candidates (label -1) last. (b, m), (b, m) -> (b, k), (b, k)."""
    s = np.where(labels >= 0, sims, -np.inf).astype(np.float32)
    order = np.lexsort((np.where(labels >= 0, labels, np.iinfo(np.int64).max), -s.astype(np.float64)), axis=1)[:, :k]
    return np.take_along_axis(s, order, 1), np.take_along_axis(labels, order, 1)


PROGRESS_STEPS, PROGRESS_MIN_ROWS = 20, 4096  # chunks small enough that progress moves, not tiny


def chunk_rows(dim: int, k: int, memory_mb: float) -> int:
    """Rows per chunk so that one chunk's copies (Arrow, float32 raw and unit, results, search
    scratch: about 6 vector copies a row) stay within ``memory_mb``. The training sample
    (``train_size`` vectors) comes on top."""
    per_row = 6 * 4 * dim + 3 * 12 * (k + 1) + 64
    return int(max(256, memory_mb * 2**20 // per_row))


def iter_chunks(parts: list[Path], columns: list[str], rows: int) -> Iterator[pa.RecordBatch]:
    """Record batches of at most ``rows`` rows over the parts, in order."""
    for p in parts:
        for batch in pq.ParquetFile(str(p)).iter_batches(batch_size=rows, columns=columns):
            if batch.num_rows:
                yield batch


class IndexWorker:
    """One shard of the index: the trained template (serialised FAISS index), filled with the rows it
    is given; labels are the caller's (positions). A plain class: the stage wraps it as a Ray actor."""

    def __init__(self, template: np.ndarray, use_gpu: bool = False, nprobe: int = 0):
        faiss = faiss_module()
        index = faiss.deserialize_index(np.asarray(template, np.uint8))
        self.gpu = use_gpu_index(faiss, bool(use_gpu))  # a FAISS that cannot search here: the CPU
        self.gpu_problem = gpu_problem(faiss) if use_gpu and not self.gpu else None
        if self.gpu:
            index = faiss.index_cpu_to_all_gpus(index)
            if nprobe:
                faiss.GpuParameterSpace().set_index_parameter(index, "nprobe", nprobe)
        self.index = index
        self.labels: list[np.ndarray] = []
        self._labels = np.zeros(0, np.int64)

    def add(self, x: np.ndarray, labels: np.ndarray) -> int:
        self.index.add(np.ascontiguousarray(x, np.float32))
        self.labels.append(np.asarray(labels, np.int64))
        return int(self.index.ntotal)

    def search(self, q: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        """-> (sims (b, k), labels (b, k)); label -1 where the index had fewer than k."""
        if len(self.labels) != 1 or len(self._labels) != self.index.ntotal:
            self._labels = np.concatenate(self.labels) if self.labels else np.zeros(0, np.int64)
            self.labels = [self._labels]
        kk = min(k, int(self.index.ntotal))
        if kk == 0:
            return np.full((len(q), k), -np.inf, np.float32), np.full((len(q), k), -1, np.int64)
        s, i = self.index.search(np.ascontiguousarray(q, np.float32), kk)
        lab = np.where(i >= 0, self._labels[np.maximum(i, 0)], -1)
        if kk < k:
            s = np.pad(s, ((0, 0), (0, k - kk)), constant_values=-np.inf)
            lab = np.pad(lab, ((0, 0), (0, k - kk)), constant_values=-1)
        return s, lab

    def on_gpu(self) -> tuple[bool, str | None]:
        """(whether the index is on the GPUs, why not where they were asked for)."""
        return self.gpu, self.gpu_problem

    def memory_bytes(self) -> int:
        """Bytes the index's stored vectors (codes) take."""
        faiss = faiss_module()
        try:
            ivf = faiss.extract_index_ivf(self.index)
            return int(ivf.invlists.compute_ntotal() * ivf.code_size) if hasattr(ivf.invlists, "compute_ntotal") \
                else int(ivf.ntotal * ivf.code_size)
        except (RuntimeError, AttributeError):
            return int(self.index.ntotal * self.index.d * 4)


class LocalPool:
    """Workers in this process (tests, tiny corpora)."""

    def __init__(self, template: np.ndarray, workers: int, use_gpu: bool, nprobe: int):
        self.workers = [IndexWorker(template, use_gpu, nprobe) for _ in range(workers)]

    def add(self, w: int, x: np.ndarray, labels: np.ndarray) -> None:
        self.workers[w].add(x, labels)

    def flush(self) -> None:
        pass

    def search(self, q: np.ndarray, k: int) -> list[tuple[np.ndarray, np.ndarray]]:
        return [w.search(q, k) for w in self.workers]

    def memory_bytes(self) -> int:
        return sum(w.memory_bytes() for w in self.workers)

    def on_gpu(self) -> list[tuple[bool, str | None]]:
        return [w.on_gpu() for w in self.workers]


class RayPool:
    """Workers as Ray actors (one GPU each when ``use_gpu``); at most two adds in flight a worker,
    so the object store holds a bounded number of chunks. A CPU worker reserves its share of a node's
    CPUs: Ray sets a worker's OpenMP threads (FAISS's) to the CPUs it holds."""

    def __init__(self, template: np.ndarray, workers: int, use_gpu: bool, nprobe: int,
                 node_cpus: list[int] | None = None):
        import ray

        from grads_ray.resources import node_cpus as cluster_node_cpus

        self._ray = ray
        nodes = node_cpus or cluster_node_cpus()  # CPUs per node
        cpus = 1 if use_gpu else max(1, min(nodes) // -(-workers // len(nodes)))
        actor = ray.remote(num_cpus=cpus, num_gpus=1 if use_gpu else 0)(IndexWorker)
        tref = ray.put(template)
        self.workers = [actor.remote(tref, use_gpu, nprobe) for _ in range(workers)]
        self.pending: list[Any] = []

    def add(self, w: int, x: np.ndarray, labels: np.ndarray) -> None:
        self.pending.append(self.workers[w].add.remote(x, labels))
        if len(self.pending) > 2 * len(self.workers):
            self._ray.get(self.pending.pop(0))

    def flush(self) -> None:
        self._ray.get(self.pending)
        self.pending = []

    def on_gpu(self) -> list[tuple[bool, str | None]]:
        return self._ray.get([w.on_gpu.remote() for w in self.workers])

    def search(self, q: np.ndarray, k: int) -> list[tuple[np.ndarray, np.ndarray]]:
        qref = self._ray.put(q)
        return self._ray.get([w.search.remote(qref, k) for w in self.workers])

    def memory_bytes(self) -> int:
        return sum(self._ray.get([w.memory_bytes.remote() for w in self.workers]))

    def close(self) -> None:
        for w in self.workers:
            self._ray.kill(w)


@dataclass
class StreamSettings:
    """What the streamed stage needs from the config (SimilarityConfig plus resolved choices)."""

    column: str
    k: int = 10
    threshold: float = 0.99
    spec: IndexSpec | None = None
    recall_sample: int = 1000
    clusters: int = -1
    center: bool = True
    memory_mb: float = 512.0
    workers: int = 1
    use_gpu: bool = False
    seed: int = 0
    chunk_rows: int = 0  # rows per chunk and output part; 0: from memory_mb (the tests set it small)


def _unit(x: np.ndarray, mean: np.ndarray | None) -> np.ndarray:
    """Centred (the mean is float64-accumulated, subtracted in float32: no float64 copy of a chunk)
    and L2-normalised rows."""
    return l2_normalize(x - mean.astype(np.float32) if mean is not None else x)


def _searched(path: Path, marker: Path, positions: np.ndarray) -> tuple[np.ndarray, np.ndarray] | None:
    """A chunk's (nn_sims, nn_rows) as an earlier, interrupted run of the same stage wrote them, when
    its marker is there and it holds exactly these positions (the same chunking). -> None otherwise."""
    if not marker.exists() or not path.exists():
        return None
    t = pq.read_table(str(path), columns=["position", "nn_rows", "nn_sims"])
    if not np.array_equal(t["position"].to_numpy(), positions):
        return None
    return matrix(t["nn_sims"]), matrix(t["nn_rows"], np.int64)


def _template(sample: np.ndarray, n: int, d: int, spec: IndexSpec) -> tuple[np.ndarray, str, str]:
    """The empty (trained) index every worker starts from, serialised. -> (bytes, kind, name)."""
    index, kind, name = trained_index(sample, n, d, spec)
    return faiss_module().serialize_index(index), kind, name


def similarity_over_parts(parts: list[Path], out_part, st: StreamSettings, pool_cls=LocalPool,
                          progress=None) -> dict[str, Any]:
    """Run the four passes over ``parts`` (Parquet with ``id`` and ``st.column``); write one part a
    chunk through ``out_part(i) -> path``: id, position (the row's place in id order), nn_rows (the
    neighbours' positions), nn_sims, diversity, cluster, dup_group (the smallest position in its group).
    ``progress(rows)`` is called as each chunk's search (the longest pass) is written.
    -> the manifest's figures (index, recall, groups, memory, chunk rows)."""
    faiss = faiss_module()
    pos = id_positions(parts)[0]  # pass 0: each row's position in id order, in reading order
    n = len(pos)
    first = next(iter_chunks(parts, [st.column], 1), None)
    d = len(first.column(0)[0]) if first is not None else 1
    rows = st.chunk_rows or min(chunk_rows(d, st.k, st.memory_mb), max(PROGRESS_MIN_ROWS, -(-n // PROGRESS_STEPS)))
    kk = max(0, min(st.k, n - 1))
    spec = st.spec or IndexSpec(kind="flat", seed=st.seed)
    kind = spec.resolve(max(n, 1), d)[0]
    n_clusters = auto_clusters(n) if st.clusters < 0 else st.clusters

    # pass 1: mean and the sample (by position, so the same whatever the sharding)
    rng = np.random.default_rng(spec.seed)
    train_pos = np.sort(rng.choice(n, min(n, spec.train_size), replace=False)) if n else np.zeros(0, np.int64)
    query_pos = np.sort(np.random.default_rng(st.seed).choice(n, min(st.recall_sample, n), replace=False)) \
        if kind != "flat" and n else np.zeros(0, np.int64)
    want = np.union1d(train_pos, query_pos)
    total = np.zeros(d, np.float64)
    got_pos, got_vec = [], []
    start = 0
    for batch in iter_chunks(parts, [st.column], rows):
        x = zero_nonfinite(matrix(batch.column(0)))
        p = pos[start:start + len(x)]
        start += len(x)
        total += x.sum(0, dtype=np.float64)
        hit = np.isin(p, want)
        got_pos.append(p[hit])
        got_vec.append(x[hit])
    mean = total / max(n, 1) if st.center else None
    sample_pos = np.concatenate(got_pos) if got_pos else np.zeros(0, np.int64)
    sample = np.concatenate(got_vec) if got_vec else np.zeros((0, d), np.float32)
    sample, sample_pos = sample[np.argsort(sample_pos)], np.sort(sample_pos)
    sample = _unit(sample, mean) if len(sample) else sample
    train = sample[np.isin(sample_pos, train_pos)]
    queries = sample[np.isin(sample_pos, query_pos)]
    del got_vec, sample

    template, kind, index_name = _template(train, max(n, 1), d, spec)
    workers = max(1, st.workers)
    pool = pool_cls(template, workers, st.use_gpu, spec.nprobe if kind != "flat" else 0)
    placed = pool.on_gpu()
    on_gpu = bool(placed) and all(g for g, _ in placed)
    fallback = next((why for g, why in placed if not g and why), None)
    if on_gpu:
        index_name += "(gpu)"
    elif fallback:
        log.warning("grads-ray: similarity: the index workers run on the CPU: %s", fallback)
    centroids = None
    if n >= 2 and n_clusters > 1:
        centroids = faiss.IndexFlatIP(d)
        centroids.add(kmeans_centroids(train, n_clusters, st.seed, use_gpu=st.use_gpu))
    del train

    # pass 2: fill the workers; clusters; exact neighbours of the recall queries
    clusters = np.zeros(n, np.int64)
    filled = np.zeros(workers, np.int64)
    truth_s = np.full((len(queries), kk + 1), -np.inf, np.float32)
    truth_i = np.full((len(queries), kk + 1), -1, np.int64)
    start = 0
    for batch in iter_chunks(parts, [st.column], rows):
        x = _unit(zero_nonfinite(matrix(batch.column(0))), mean)
        p = pos[start:start + len(x)]
        start += len(x)
        w = int(np.argmin(filled))
        pool.add(w, x, p)
        filled[w] += len(x)
        if centroids is not None:
            clusters[p] = centroids.search(x, 1)[1][:, 0]
        for b in range(0, len(x), 8192):
            if not len(queries) or not kk:
                break
            s = queries @ x[b:b + 8192].T
            lab = np.broadcast_to(p[b:b + 8192], s.shape)
            top = np.argpartition(-s, min(kk, s.shape[1] - 1), axis=1)[:, :kk + 1]
            truth_s, truth_i = merge_topk(np.hstack([truth_s, np.take_along_axis(s, top, 1)]),
                                          np.hstack([truth_i, np.take_along_axis(lab, top, 1)]), kk + 1)
    pool.flush()
    if len(queries):
        _, truth_i = _drop_self(truth_s, truth_i, query_pos, kk)

    # pass 3: search every chunk on every worker, merge, write; pairs for the components
    pairs_a, pairs_b = [], []
    found = 0
    written: list[tuple[Path, np.ndarray]] = []
    start = 0
    resumed = 0
    for i, batch in enumerate(iter_chunks(parts, ["id", st.column], rows)):
        p = pos[start:start + batch.num_rows]
        start += batch.num_rows
        path = storage.location(out_part(i))
        marker = path.parent / LEDGER / "chunks" / f"{path.stem}.json"
        earlier = _searched(path, marker, p)  # an interrupted run searched this chunk already
        if earlier is not None:
            sims, nn = earlier
            resumed += 1
        elif kk:
            x = _unit(zero_nonfinite(matrix(batch.column(1))), mean)
            res = pool.search(x, kk + 1)
            s, lab = merge_topk(np.hstack([r[0] for r in res]), np.hstack([r[1] for r in res]), kk + 1)
            sims, nn = _drop_self(s, lab, p, kk)
        else:
            sims, nn = np.zeros((len(p), 0), np.float32), np.zeros((len(p), 0), np.int64)
        r, c = np.nonzero((sims >= st.threshold) & (nn >= 0))
        pairs_a.append(p[r])
        pairs_b.append(nn[r, c])
        if len(query_pos):
            at = np.searchsorted(query_pos, p)
            hit = (at < len(query_pos)) & (query_pos[np.minimum(at, len(query_pos) - 1)] == p)
            for row, q in zip(np.flatnonzero(hit), at[hit], strict=True):
                a, b = nn[row], truth_i[q]
                found += len(np.intersect1d(a[a >= 0], b[b >= 0]))
        if earlier is None:
            write_parquet(path, pa.table({"id": batch.column(0), "position": pa.array(p), "nn_rows": lists(nn),
                                          "nn_sims": lists(sims), "diversity": pa.array(diversity(sims)),
                                          "cluster": pa.array(clusters[p])}))
            write_json(marker, {"chunk": i, "rows": len(p)})
        written.append((path, p))
        if progress:
            progress(len(p))
    if not written:  # no rows: one empty part, so readers see the columns
        empty = np.zeros((0, 0))
        write_parquet(out_part(0), pa.table({
            "id": pa.array([], pa.string()), "position": pa.array([], pa.int64()),
            "nn_rows": lists(empty.astype(np.int64)),
            "nn_sims": lists(empty.astype(np.float32)), "diversity": pa.array([], pa.float32()),
            "cluster": pa.array([], pa.int64())}))
        written.append((storage.location(out_part(0)), np.zeros(0, np.int64)))
    index_bytes = pool.memory_bytes()
    if hasattr(pool, "close"):
        pool.close()

    cat = lambda a: np.concatenate(a) if a else np.zeros(0, np.int64)  # noqa: E731
    groups = union_find_groups(n, cat(pairs_a), cat(pairs_b))
    for path, p in written:  # the components need every pair: add them last, part by part
        t = pq.read_table(str(path))
        t = t.drop_columns(["dup_group"]) if "dup_group" in t.column_names else t  # a resumed run's
        write_parquet(path, t.append_column("dup_group", pa.array(groups[p])))
    recall = 1.0 if kind == "flat" or not len(query_pos) else found / max(int((truth_i >= 0).sum()), 1)
    sizes = np.bincount(groups, minlength=max(n, 1)) if n else np.zeros(0, np.int64)
    return {"index": index_name, "exact": kind == "flat", "recall_at_k": round(float(recall), 4),
            "dup_threshold": st.threshold, "k": int(kk), "vectors": int(n), "dim": int(d),
            "clusters": int(clusters.max(initial=-1)) + 1 if centroids is not None else int(n > 0),
            "dup_groups": int((sizes > 1).sum()), "rows_in_dup_groups": int(sizes[sizes > 1].sum()),
            "workers": workers, "chunk_rows": rows, "chunks": len(written), "chunks_resumed": resumed,
            "index_bytes": int(index_bytes),
            "gpu": on_gpu, **({"faiss_gpu_fallback": fallback} if fallback else {})}
