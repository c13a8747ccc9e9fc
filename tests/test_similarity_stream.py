"""The streamed, sharded similarity stage equals the in-memory k-NN (and numpy brute force) whatever
the shards, chunks and index workers; near-duplicates planted in vectors and in edited texts are
found with no false merges at the default threshold."""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from grads_ray.similarity.index import IndexSpec, duplicate_groups, knn
from grads_ray.similarity.stream import (
    IndexWorker,
    LocalPool,
    StreamSettings,
    _template,
    chunk_rows,
    merge_topk,
    similarity_over_parts,
)
from tests.test_similarity import _clustered, brute_knn


def _write_parts(tmp_path, ids: list[str], x: np.ndarray, n_parts: int, seed: int, column: str = "vec"):
    """The rows shuffled over ``n_parts`` Parquet files (as score shards hold them)."""
    order = np.random.default_rng(seed).permutation(len(ids))
    paths = []
    for j, chunk in enumerate(np.array_split(order, n_parts)):
        p = tmp_path / f"in-{n_parts}-{seed}-{j:03d}.parquet"
        pq.write_table(pa.table({"id": pa.array([ids[i] for i in chunk], pa.string()),
                                 column: pa.array(list(x[chunk]), pa.list_(pa.float32()))}), p)
        paths.append(p)
    return paths


def _run(tmp_path, parts, st: StreamSettings, tag: str):
    out = tmp_path / f"out-{tag}"
    out.mkdir()
    info = similarity_over_parts(parts, lambda i: out / f"part-{i:05d}.parquet", st)
    t = pa.concat_tables([pq.read_table(p) for p in sorted(out.glob("part-*.parquet"))])
    t = t.sort_by("id")
    n = t.num_rows
    nn = np.stack([np.asarray(r, np.int64) for r in t["nn_rows"].to_pylist()]) if n else None
    sims = np.stack([np.asarray(r, np.float32) for r in t["nn_sims"].to_pylist()]) if n else None
    return info, t, sims, nn


def test_merge_topk_by_hand():
    s = np.array([[0.9, 0.1, 0.5, 0.9, 0.3, 0.0]], np.float32)
    lab = np.array([[7, 1, 2, 3, -1, 5]])
    ms, ml = merge_topk(s, lab, 4)
    assert ml.tolist() == [[3, 7, 2, 1]]  # equal sims: the smaller label first; -1 never before a real one
    np.testing.assert_allclose(ms, [[0.9, 0.9, 0.5, 0.1]])


def test_chunk_rows_follow_the_budget():
    assert chunk_rows(256, 16, 512) > 10 * chunk_rows(256, 16, 40)
    assert chunk_rows(256, 16, 0.01) == 256  # a floor, so progress is made


@pytest.mark.parametrize("n_parts,workers,memory_mb", [(1, 1, 512), (7, 3, 0.01)])
def test_stream_equals_in_memory_knn_and_brute_force(tmp_path, n_parts, workers, memory_mb):
    n, d, k = 1500, 16, 8
    x = _clustered(n, d, 5)
    x[10] = x[11] * 2.0  # a planted duplicate pair (cosine 1 before centring, near 1 after)
    x[700] = 0.0  # a zero row: stays zero, nobody's duplicate
    ids = [f"ex-{i:05d}" for i in range(n)]  # id order = row order, so positions = rows
    parts = _write_parts(tmp_path, ids, x, n_parts, seed=n_parts)
    st = StreamSettings(column="vec", k=k, threshold=0.99, memory_mb=memory_mb, workers=workers, clusters=12,
                        recall_sample=200, seed=0)
    info, t, sims, nn = _run(tmp_path, parts, st, f"{n_parts}-{workers}")
    assert info["chunks"] >= (6 if memory_mb < 1 else 1) and info["exact"] and info["recall_at_k"] == 1.0
    ref_s, ref_i, _ = knn(x, k)
    np.testing.assert_allclose(sims, ref_s, atol=1e-5)
    assert (nn == ref_i).mean() > 0.995
    b_s, b_i = brute_knn(np.where(np.arange(n)[:, None] == 700, 1e-30, x), k)  # float64 reference
    np.testing.assert_allclose(np.delete(sims, 700, 0), np.delete(b_s, 700, 0), atol=1e-5)
    groups = t["dup_group"].to_numpy()
    assert (groups == duplicate_groups(ref_s, ref_i, 0.99)).all()
    assert groups[11] == groups[10] == 10 and (groups == np.arange(n)).sum() >= n - 5
    assert set(t.column_names) >= {"id", "position", "nn_rows", "nn_sims", "dup_group", "diversity", "cluster"}
    assert t["position"].to_pylist() == list(range(n))  # the place in id order, which nn_rows index
    assert t["cluster"].to_numpy().max() < 12 and len(np.unique(t["cluster"].to_numpy())) > 6


def test_stream_is_the_same_for_any_sharding(tmp_path):
    """Shards, chunks and workers change nothing: neighbours, groups, clusters (sampled by position)."""
    n, d = 900, 12
    x = _clustered(n, d, 9)
    ids = [f"{i * 7919 % 10007:06d}" for i in range(n)]  # ids not in row order
    spec = IndexSpec(kind="ivf_flat", nlist=10, nprobe=3, train_size=500, seed=0)
    outs = []
    for n_parts, workers, mem in ((1, 1, 512), (5, 2, 0.01), (3, 4, 0.02)):
        parts = _write_parts(tmp_path, ids, x, n_parts, seed=n_parts)
        st = StreamSettings(column="vec", k=6, spec=spec, memory_mb=mem, workers=workers, clusters=8,
                            recall_sample=300, seed=1)
        info, t, sims, nn = _run(tmp_path, parts, st, f"{n_parts}-{workers}")
        outs.append((info, t, sims, nn))
    (i0, t0, s0, n0) = outs[0]
    assert not i0["exact"] and 0.3 < i0["recall_at_k"] < 1.0  # 3 of 10 cells: approximate, and measured
    for info, t, sims, nn in outs[1:]:
        assert t["id"].equals(t0["id"]) and info["recall_at_k"] == i0["recall_at_k"]
        np.testing.assert_allclose(sims, s0, atol=1e-5)
        assert (nn == n0).mean() > 0.995
        assert t["cluster"].equals(t0["cluster"]) and t["dup_group"].equals(t0["dup_group"])


def test_ivf_stream_recall_is_the_brute_force_recall(tmp_path):
    n, k = 3000, 8
    x = _clustered(n, 24, 2)
    ids = [f"r{i:05d}" for i in range(n)]
    parts = _write_parts(tmp_path, ids, x, 4, seed=0)
    spec = IndexSpec(kind="ivf_flat", nlist=48, nprobe=2, seed=0)
    st = StreamSettings(column="vec", k=k, spec=spec, memory_mb=0.05, workers=2, recall_sample=3000, seed=0)
    info, t, sims, nn = _run(tmp_path, parts, st, "ivf")
    _, ref_i = brute_knn(x, k)
    direct = np.mean([len(np.intersect1d(nn[r], ref_i[r])) / k for r in range(n)])
    assert info["recall_at_k"] < 0.99 and info["recall_at_k"] == pytest.approx(direct, abs=2e-3)
    assert info["index_bytes"] == n * 24 * 4  # IVF-Flat stores the vectors


def test_index_worker_pads_when_it_holds_fewer_than_k():
    template, _, _ = _template(np.zeros((0, 4), np.float32), 3, 4, IndexSpec(kind="flat"))
    w = IndexWorker(template)
    w.add(np.eye(4, dtype=np.float32)[:2], np.array([10, 20]))
    s, lab = w.search(np.eye(4, dtype=np.float32)[:1], 4)
    assert lab.tolist() == [[10, 20, -1, -1]] and np.isinf(s[0, 2:]).all()
    assert LocalPool(template, 2, False, 0).search(np.eye(4, dtype=np.float32)[:1], 2)[0][1].tolist() == [[-1, -1]]


def test_empty_and_single_row_corpora(tmp_path):
    for n in (0, 1):
        x = np.ones((n, 4), np.float32)
        parts = _write_parts(tmp_path, [f"a{i}" for i in range(n)], x, 1, seed=10 + n)
        if n == 0:  # a shard with no rows still has the vector column's type
            pq.write_table(pa.table({"id": pa.array([], pa.string()), "vec": pa.array([], pa.list_(pa.float32()))}),
                           parts[0])
        info, t, _, _ = _run(tmp_path, parts, StreamSettings(column="vec"), f"tiny{n}")
        assert t.num_rows == n and info["vectors"] == n and info["k"] == 0


@pytest.mark.gpu
def test_gpu_and_cpu_give_the_same_groups(tmp_path):
    """faiss-gpu (exact and IVF) against faiss-cpu on the same parts: the same near-duplicate groups
    and clusters' count, neighbours equal up to ties and float32 rounding."""
    from grads_ray.similarity.index import faiss_module, gpu_available

    if not gpu_available(faiss_module()):
        pytest.skip("no GPU faiss here")
    n = 5000
    x = _clustered(n, 32, 4)
    x[100:150] = x[:50] + 1e-3 * np.random.default_rng(0).normal(size=(50, 32)).astype(np.float32)
    parts = _write_parts(tmp_path, [f"g{i:05d}" for i in range(n)], x, 3, seed=0)
    for spec in (IndexSpec(kind="flat"), IndexSpec(kind="ivf_flat", nlist=32, nprobe=8)):
        res = []
        for gpu in (False, True):
            st = StreamSettings(column="vec", k=8, spec=spec, workers=2, use_gpu=gpu, memory_mb=1, recall_sample=500)
            res.append(_run(tmp_path, parts, st, f"{spec.kind}-{gpu}"))
        (ci, ct, cs, cn), (gi, gt, gs, gn) = res
        assert gt["dup_group"].equals(ct["dup_group"]) and gi["index"].endswith("(gpu)")
        np.testing.assert_allclose(gs, cs, atol=1e-4)
        assert (gn == cn).mean() > 0.99 and abs(gi["recall_at_k"] - ci["recall_at_k"]) < 0.02


class _Crash(Exception):
    pass


def test_an_interrupted_stage_resumes_from_its_searched_chunks(tmp_path, monkeypatch):
    """A crash after some chunks were searched and written: the rerun searches only the others and
    ends with the same neighbours, groups, clusters and recall as an uninterrupted run."""
    import grads_ray.similarity.stream as stream

    n, d = 1500, 10  # 6 chunks of 256 rows (the smallest chunk)
    x = _clustered(n, d, 4)
    x[10] = x[11] + 1e-4  # a planted near-duplicate pair
    ids = [f"{i * 7919 % 10007:06d}" for i in range(n)]
    parts = _write_parts(tmp_path, ids, x, 3, seed=2)
    st = StreamSettings(column="vec", k=5, spec=IndexSpec(kind="ivf_flat", nlist=8, nprobe=3, train_size=400, seed=0),
                        memory_mb=0.01, workers=2, clusters=6, recall_sample=200, threshold=0.99, seed=3)
    info0, t0, s0, n0 = _run(tmp_path, parts, st, "whole")
    assert info0["chunks"] >= 5 and info0["chunks_resumed"] == 0

    out = tmp_path / "out-resumed"
    out.mkdir()
    seen = {"chunks": 0}

    def crash_after_three(rows):
        seen["chunks"] += 1
        if seen["chunks"] == 3:
            raise _Crash
    with pytest.raises(_Crash):
        similarity_over_parts(parts, lambda i: out / f"part-{i:05d}.parquet", st, progress=crash_after_three)
    searched = {"rows": 0}
    real_search = stream.LocalPool.search

    def counting(self, q, k):
        searched["rows"] += len(q)
        return real_search(self, q, k)
    monkeypatch.setattr(stream.LocalPool, "search", counting)
    info = similarity_over_parts(parts, lambda i: out / f"part-{i:05d}.parquet", st)
    assert info["chunks_resumed"] == 3
    first_three = sum(pq.read_metadata(out / f"part-{i:05d}.parquet").num_rows for i in range(3))
    assert searched["rows"] == n - first_three  # only what the crash left unsearched
    t = pa.concat_tables([pq.read_table(p) for p in sorted(out.glob("part-*.parquet"))]).sort_by("id")
    assert t.equals(t0) and info == {**info0, "chunks_resumed": 3}
    group = dict(zip(t["id"].to_pylist(), t["dup_group"].to_pylist(), strict=True))
    assert group[ids[10]] == group[ids[11]]  # the planted pair: a group across the resumed boundary too


def test_progress_moves_chunk_by_chunk_on_a_single_part(tmp_path):
    """One part of 20,000 rows, well within the memory budget: the search is still cut into chunks
    of max(4096, n / 20) rows, so the progress line moves while it runs."""
    rng = np.random.default_rng(0)
    x = rng.standard_normal((20_000, 8)).astype(np.float32)
    parts = _write_parts(tmp_path, [f"r{i:05d}" for i in range(len(x))], x, 1, 0)
    steps: list[int] = []
    out = tmp_path / "out"
    out.mkdir()
    similarity_over_parts(parts, lambda i: out / f"part-{i:05d}.parquet",
                          StreamSettings(column="vec", k=4, clusters=2), progress=steps.append)
    assert sum(steps) == len(x) and len(steps) == 5 and max(steps) == 4096


class _NoKernelFaiss:
    """faiss-cpu dressed as a GPU build that sees one GPU and has no kernel for it (faiss-gpu-cu12
    1.14 on an H100): every call but the GPU ones goes to the real module."""

    def __init__(self, real):
        self._real = real
        self.StandardGpuResources = object

    def __getattr__(self, name):
        return getattr(self._real, name)

    def get_num_gpus(self):
        return 1

    def index_cpu_to_gpu(self, *args, **kwargs):
        raise RuntimeError("Error in virtual void faiss::gpu::StandardGpuResourcesImpl::initializeForDevice(int) "
                           "at StandardGpuResources.cpp:283: CUDA error 209 no kernel image is available for "
                           "execution on the device")

    index_cpu_to_all_gpus = index_cpu_to_gpu


def test_a_faiss_without_a_kernel_for_the_gpu_falls_back_to_the_cpu_saying_so(tmp_path, monkeypatch, caplog):
    """A FAISS GPU build that cannot run on the device: the check at start-up says why (once, as a
    warning); every GPU path — index workers, build_index, k-means — runs on the CPU instead of
    failing inside a worker, with the same results, and the stage's info names the fallback."""
    import logging

    from grads_ray.similarity import index as index_mod
    from grads_ray.similarity import stream as stream_mod

    fake = _NoKernelFaiss(index_mod.faiss_module())
    monkeypatch.setattr(index_mod, "faiss_module", lambda: fake)
    monkeypatch.setattr(stream_mod, "faiss_module", lambda: fake)
    monkeypatch.setattr(index_mod, "_GPU_CHECKED", {})
    with caplog.at_level(logging.WARNING):
        why = index_mod.gpu_problem(fake)
        assert index_mod.gpu_problem(fake) == why  # checked once a process
    assert "cannot search on" in why and "no kernel image is available" in why
    assert sum("the similarity index runs on the CPU" in r.getMessage() for r in caplog.records) == 1
    assert not index_mod.gpu_available(fake) and not index_mod.use_gpu_index(fake, True)

    n = 400
    x = _clustered(n, 16, 3)
    parts = _write_parts(tmp_path, [f"f{i:04d}" for i in range(n)], x, 2, seed=1)
    res = {}
    for gpu in (False, True):
        st = StreamSettings(column="vec", k=5, spec=IndexSpec(kind="flat"), workers=2, use_gpu=gpu, memory_mb=1)
        res[gpu] = _run(tmp_path, parts, st, f"nokernel-{gpu}")
    (ci, ct, _, cn), (gi, gt, _, gn) = res[False], res[True]
    assert gi["gpu"] is False and not gi["index"].endswith("(gpu)")
    assert "no kernel image is available" in gi["faiss_gpu_fallback"] and "faiss_gpu_fallback" not in ci
    assert gt.equals(ct)
    np.testing.assert_array_equal(gn, cn)
    sims, idx, name = knn(x, 5, use_gpu=True)
    assert not name.endswith("(gpu)")
    np.testing.assert_array_equal(idx, knn(x, 5, use_gpu=False)[1])


def test_a_cpu_faiss_asked_for_the_gpu_runs_on_the_cpu():
    """faiss-cpu with similarity.use_gpu=true: the worker says why it is on the CPU."""
    from grads_ray.similarity.index import faiss_module, gpu_problem

    faiss = faiss_module()
    if hasattr(faiss, "StandardGpuResources") and faiss.get_num_gpus() > 0:
        pytest.skip("a GPU FAISS here")
    spec = IndexSpec(kind="flat")
    template, _, _ = _template(np.random.default_rng(0).normal(size=(8, 4)).astype(np.float32), 8, 4, spec)
    gpu, why = IndexWorker(template, use_gpu=True).on_gpu()
    assert gpu is False and why == gpu_problem(faiss) and why


@pytest.mark.gpu
def test_faiss_gpu_search_equals_cpu_search():
    """The same exact (flat) index searched on the GPU and on the CPU: the same neighbours up to
    ties, the same similarities up to float32 rounding."""
    from grads_ray.similarity.index import faiss_module, gpu_problem

    faiss = faiss_module()
    if not hasattr(faiss, "StandardGpuResources") or faiss.get_num_gpus() == 0:
        pytest.skip("no GPU faiss here")
    assert gpu_problem(faiss) is None, gpu_problem(faiss)
    x = _clustered(20000, 64, 5)
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    cpu = faiss.IndexFlatIP(64)
    cpu.add(x)
    gpu = faiss.index_cpu_to_all_gpus(cpu)
    cs, ci = cpu.search(x[:2000], 16)
    gs, gi = gpu.search(x[:2000], 16)
    np.testing.assert_allclose(gs, cs, atol=1e-4)
    assert (gi == ci).mean() > 0.99
