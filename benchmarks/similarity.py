"""k-NN at corpus scale: FAISS (exact and IVF) against numpy brute force, measured in the same run.

For N vectors of dimension d (clustered synthetic data: 1,000 Gaussian centres), each vector's k
nearest others by cosine:
- ``numpy``: the baseline, a blocked brute force (one matmul per block of queries, then argpartition);
- ``flat``: grads-ray's exact index (``IndexFlatIP``), same answers;
- ``ivf``: IVF-Flat with about 4·√N cells and ``--nprobe``, its recall@k measured against exact
  search on 1,000 queries.
Prints seconds, speed-up over numpy and recall; numpy is skipped above ``--numpy-max`` rows.

    python benchmarks/similarity.py --quick            # N = 10^4 and 10^5, d = 256, k = 16: CPU minutes
    python benchmarks/similarity.py --sizes 1000000    # on a GPU machine (faiss-gpu)
    # the GPU goals (issue 21): 10^6 exact in <= 30 s; 10^7 IVF at recall@16 >= 0.95
    python benchmarks/similarity.py --sizes 1000000 --indexes flat --knn-only --gpu true
    python benchmarks/similarity.py --sizes 10000000 --indexes ivf --knn-only --gpu true --train-size 500000

``--gpu true`` asks for the GPU index; where FAISS cannot search on the GPU (no GPU build, no kernel
for the device: ``grads_ray.similarity.index.gpu_problem``) the run says why and uses the CPU, and
the JSON's ``gpu`` is false. ``--knn-only`` skips the SemDeDup and stage-memory parts.

Two more measurements, in the same run:
- SemDeDup (arXiv 2303.09540, NeMo Curator's semantic dedup) on the same vectors with planted
  near-copies: spherical k-means (FAISS), all pairs inside each cluster, pairs with cosine >= 1 - eps
  joined; against grads-ray's groups (k-NN pairs at the same threshold, components). Time, planted
  copies found, and how far the two agree;
- the whole similarity stage (streamed, index in a Ray actor) at two sizes, its driver's peak
  memory (VmHWM of a fresh process) beside an in-memory run of the same data; IVF-PQ bytes per
  vector.

The last line printed is one JSON object with the headline figures.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from timing import timed  # benchmarks/timing.py: scripts run as python benchmarks/NAME.py

from grads_ray.similarity.index import (
    IndexSpec,
    duplicate_groups,
    faiss_module,
    gpu_problem,
    knn,
    l2_normalize,
    recall_at_k,
    union_find_groups,
    unit_vectors,
    use_gpu_index,
)


def clustered(n: int, d: int, seed: int) -> np.ndarray:
    """(n, d) float32: 1,000 Gaussian centres plus noise, drawn in float32 and added in place (at 10^7 x
    256 the float64 draw and its temporaries took most of the device check's 220 s: 4x slower)."""
    rng = np.random.default_rng(seed)
    centres = rng.standard_normal((1000, d), dtype=np.float32)
    x = centres[rng.integers(0, 1000, n)]
    noise = rng.standard_normal((n, d), dtype=np.float32)
    noise *= 0.7
    x += noise
    return x


def numpy_knn(x: np.ndarray, k: int, block: int = 2048) -> np.ndarray:
    """Brute force: cosine of each block of queries against all, the top k others. -> (N, k) indices."""
    x = l2_normalize(x - x.mean(0))
    out = np.empty((len(x), k), np.int64)
    for s in range(0, len(x), block):
        sims = x[s:s + block] @ x.T
        sims[np.arange(len(sims)), np.arange(s, s + len(sims))] = -np.inf
        top = np.argpartition(-sims, k, axis=1)[:, :k]
        order = np.argsort(-np.take_along_axis(sims, top, 1), axis=1, kind="stable")
        out[s:s + block] = np.take_along_axis(top, order, 1)
    return out


def planted(n: int, d: int, share: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Clustered vectors of which ``share`` are near-copies (small noise) of others.
    -> (x (n, d), source row of each copy or -1)."""
    rng = np.random.default_rng(seed)
    x = clustered(n, d, seed)
    copies = rng.choice(n, int(share * n), replace=False)
    src = np.full(n, -1)
    src[copies] = rng.choice(np.setdiff1d(np.arange(n), copies), len(copies))
    x[copies] = x[src[copies]] + 0.01 * rng.normal(size=(len(copies), d)).astype(np.float32)
    return x, src


def semdedup_groups(x: np.ndarray, eps: float, clusters: int, seed: int) -> np.ndarray:
    """SemDeDup: spherical k-means of the centred unit vectors, then every pair inside each cluster
    with cosine >= 1 - eps joined (components). (N, d) -> (N,) group ids."""
    faiss = faiss_module()
    u = unit_vectors(x)
    km = faiss.Kmeans(u.shape[1], clusters, niter=20, seed=seed, spherical=True, verbose=False)
    km.train(u)
    assign = km.index.search(u, 1)[1][:, 0]
    a_all, b_all = [], []
    for c in np.unique(assign):
        rows = np.flatnonzero(assign == c)
        sims = u[rows] @ u[rows].T
        a, b = np.nonzero(np.triu(sims >= 1.0 - eps, 1))
        a_all.append(rows[a])
        b_all.append(rows[b])
    return union_find_groups(len(u), np.concatenate(a_all), np.concatenate(b_all))


def same_group_share(groups_a: np.ndarray, groups_b: np.ndarray) -> float:
    """Of the rows that ``groups_a`` puts in a group with others, the share whose whole group
    ``groups_b`` keeps together (1.0 = b merges at least what a merges)."""
    sizes = np.bincount(groups_a, minlength=len(groups_a))
    in_group = np.flatnonzero(sizes[groups_a] > 1)
    if not len(in_group):
        return 1.0
    first_b = {}
    for g, h in zip(groups_a[in_group].tolist(), groups_b[in_group].tolist(), strict=True):
        first_b.setdefault(g, set()).add(h)
    kept = {g for g, hs in first_b.items() if len(hs) == 1}
    return float(np.isin(groups_a[in_group], list(kept)).mean())


def compare_semdedup(n: int, d: int, k: int, eps: float, seed: int = 0) -> dict:
    x, src = planted(n, d, 0.02, seed)
    clusters = int(round(n ** 0.5))
    sem, t_sem = timed(semdedup_groups, x, eps, clusters, seed)
    (sims, idx, _), t_knn = timed(knn, x, k, spec=IndexSpec(kind="flat"))
    ours, t_cc = timed(duplicate_groups, sims, idx, 1.0 - eps)
    copies = np.flatnonzero(src >= 0)
    return {"n": n, "eps": eps, "semdedup_clusters": clusters, "semdedup_s": round(t_sem, 2),
            "ours_s": round(t_knn + t_cc, 2),
            "planted_found_ours": round(float((ours[copies] == ours[src[copies]]).mean()), 4),
            "planted_found_semdedup": round(float((sem[copies] == sem[src[copies]]).mean()), 4),
            "ours_keeps_semdedup_groups": round(same_group_share(sem, ours), 4),
            "semdedup_keeps_our_groups": round(same_group_share(ours, sem), 4),
            "rows_in_groups_ours": int((np.bincount(ours)[ours] > 1).sum()),
            "rows_in_groups_semdedup": int((np.bincount(sem)[sem] > 1).sum())}


def _write_features(folder: Path, n: int, d: int, rows_per_part: int = 50_000) -> list[Path]:
    import pyarrow as pa
    import pyarrow.parquet as pq

    paths = []
    for j, start in enumerate(range(0, n, rows_per_part)):
        m = min(rows_per_part, n - start)
        x = clustered(m, d, 1000 + j)
        ids = pa.array([f"ex-{i:09d}" for i in range(start, start + m)])
        col = pa.FixedSizeListArray.from_arrays(pa.array(x.reshape(-1)), d).cast(pa.list_(pa.float32()))
        p = folder / f"part-{j:05d}.parquet"
        pq.write_table(pa.table({"id": ids, "vec": col}), p)
        paths.append(p)
    return paths


def _peak_mb() -> float:
    """This process's peak resident memory. VmHWM (Linux) starts afresh at exec, unlike ru_maxrss,
    which a child keeps from the parent that forked it."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024  # kB
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # elsewhere: an upper bound


def stage_child(folder: str, mode: str, memory_mb: float, k: int) -> None:
    """Run in a fresh process: the stage over the parts in ``folder`` (``stream``: grads-ray's streamed
    stage with a Ray index worker; ``memory``: read everything, then knn). Prints one JSON line."""
    import time

    import pyarrow.parquet as pq
    import ray

    from grads_ray.similarity.stream import RayPool, StreamSettings, similarity_over_parts

    parts = sorted(Path(folder).glob("part-*.parquet"))
    out = Path(folder) / f"out-{mode}"
    out.mkdir(exist_ok=True)
    ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False)
    before = _peak_mb()
    t0 = time.perf_counter()
    spec = IndexSpec(seed=0)
    if mode == "stream":
        info = similarity_over_parts(parts, lambda i: out / f"part-{i:05d}.parquet",
                                     StreamSettings(column="vec", k=k, spec=spec, memory_mb=memory_mb, workers=1),
                                     pool_cls=RayPool)
    else:
        import pyarrow as pa

        from grads_ray.columns import matrix

        x = matrix(pa.concat_tables([pq.read_table(p) for p in parts])["vec"])
        sims, idx, name = knn(x, k, spec=spec)
        info = {"index": name, "index_bytes": 0}
    secs = time.perf_counter() - t0
    print(json.dumps({"mode": mode, "peak_mb": round(_peak_mb(), 1), "before_mb": round(before, 1),
                      "seconds": round(secs, 2), "index": info["index"], "index_bytes": info["index_bytes"]}))


def stage_memory(sizes: list[int], d: int, k: int, memory_mb: float) -> dict:
    """Peak driver memory of the streamed stage vs an in-memory run, each in a fresh process."""
    out = {}
    for n in sizes:
        with tempfile.TemporaryDirectory(dir=os.environ.get("TMPDIR")) as tmp:
            _write_features(Path(tmp), n, d)
            for mode in ("stream", "memory"):
                res = subprocess.run([sys.executable, __file__, "--stage-child", tmp, "--child-mode", mode,
                                      "--memory-mb", str(memory_mb), "--k", str(k)],
                                     capture_output=True, text=True, check=True)
                out[f"{mode}_{n}"] = json.loads(res.stdout.strip().splitlines()[-1])
    return out


def pq_bytes_per_vector(n: int, d: int, m: int) -> float:
    """IVF-PQ's stored bytes per vector (codes + 8-byte ids), measured on a filled index."""
    from grads_ray.similarity.index import build_index

    x = l2_normalize(clustered(n, d, 3))
    index, _ = build_index(x, IndexSpec(kind="ivf_pq", pq_m=m, nlist=int(4 * n ** 0.5)), use_gpu=False)
    ivf = faiss_module().extract_index_ivf(index)
    return float(ivf.code_size + 8)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="N = 10^4, 10^5 on CPU")
    ap.add_argument("--sizes", default=None, help="comma-separated N (default 10000,100000)")
    ap.add_argument("--dim", type=int, default=256)
    ap.add_argument("--k", type=int, default=16)
    ap.add_argument("--nprobe", type=int, default=32)
    ap.add_argument("--numpy-max", type=int, default=100_000)
    ap.add_argument("--eps", type=float, default=0.01, help="SemDeDup's eps (duplicate: cosine >= 1 - eps)")
    ap.add_argument("--semdedup-n", type=int, default=None, help="N for the SemDeDup comparison")
    ap.add_argument("--memory-sizes", default=None, help="N for the stage's peak memory (default 10^4,10^5 quick)")
    ap.add_argument("--memory-mb", type=float, default=256, help="the stage's similarity.memory_mb")
    ap.add_argument("--indexes", default="flat,ivf", help="which FAISS indexes to time: flat, ivf or both")
    ap.add_argument("--gpu", choices=("auto", "true", "false"), default="auto",
                    help="the index on the GPUs: auto (where FAISS can), true (asked; the CPU if it cannot), false")
    ap.add_argument("--train-size", type=int, default=None, help="IVF training sample (default: the job's)")
    ap.add_argument("--recall-sample", type=int, default=1000, help="queries for the IVF recall@k")
    ap.add_argument("--knn-only", action="store_true", help="skip the SemDeDup and stage-memory parts")
    ap.add_argument("--stage-child", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--child-mode", default="stream", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.stage_child:
        stage_child(args.stage_child, args.child_mode, args.memory_mb, args.k)
        return
    sizes = [int(s) for s in (args.sizes or "10000,100000").split(",")]
    indexes = [s.strip() for s in args.indexes.split(",") if s.strip()]
    if not indexes or set(indexes) - {"flat", "ivf"}:
        ap.error("--indexes: flat, ivf or flat,ivf")
    faiss = faiss_module()
    use_gpu = {"auto": None, "true": True, "false": False}[args.gpu]
    gpu = use_gpu_index(faiss, use_gpu)
    problem = gpu_problem(faiss) if use_gpu is not False else None
    print(f"# similarity benchmark: d={args.dim}, k={args.k}; {platform.machine()}, {os.cpu_count()} cpus, "
          f"faiss {faiss.__version__} ({'gpu' if gpu else 'cpu'})" + (f"; GPU not used: {problem}" if problem and use_gpu
                                                                      else ""), flush=True)
    print(f"{'N':>10}{'numpy s':>10}{'flat s':>10}{'ivf s':>10}{'flat x':>9}{'ivf x':>9}{'ivf recall':>12}")
    rows = {}
    train = {"train_size": args.train_size} if args.train_size else {}
    for n in sizes:
        t0 = time.perf_counter()
        x = clustered(n, args.dim, 0)
        print(f"# N={n:,}: vectors drawn in {time.perf_counter() - t0:.1f} s", flush=True)
        ref = t_np = flat_idx = None
        t_flat = t_ivf = recall = name = flat_name = None
        if n <= args.numpy_max:
            ref, t_np = timed(numpy_knn, x, args.k)
        if "flat" in indexes:
            (_, flat_idx, flat_name), t_flat = timed(knn, x, args.k, spec=IndexSpec(kind="flat"), use_gpu=use_gpu)
        if "ivf" in indexes:
            (_, ivf_idx, name), t_ivf = timed(knn, x, args.k, use_gpu=use_gpu,
                                              spec=IndexSpec(kind="ivf_flat", nprobe=args.nprobe, **train))
            print(f"# N={n:,}: {name} built and searched in {t_ivf:.1f} s", flush=True)
            recall = recall_at_k(x, ivf_idx, sample=args.recall_sample)
            del ivf_idx
        agree = float((np.sort(flat_idx, 1) == np.sort(ref, 1)).mean()) if ref is not None and flat_idx is not None \
            else None
        rows[n] = {"numpy_s": None if t_np is None else round(t_np, 2),
                   "flat_s": None if t_flat is None else round(t_flat, 2), "flat_index": flat_name,
                   "ivf_s": None if t_ivf is None else round(t_ivf, 2), "ivf_index": name,
                   "recall_at_k_ivf": None if recall is None else round(recall, 4),
                   "flat_agrees_with_numpy": None if agree is None else round(agree, 5)}
        fx = f"{t_np / t_flat:.1f}" if t_np and t_flat else "-"
        ix = f"{t_np / t_ivf:.1f}" if t_np and t_ivf else "-"
        print(f"{n:>10,}{(t_np or 0):>10.2f}{(t_flat or 0):>10.2f}{(t_ivf or 0):>10.2f}{fx:>9}{ix:>9}"
              f"{(recall if recall is not None else float('nan')):>12.4f}", flush=True)
        del x, flat_idx, ref
    timed_np = [n for n in sizes if rows[n]["numpy_s"]]
    big = max(timed_np) if timed_np else None
    summary = {"dim": args.dim, "k": args.k, "gpu": gpu, "gpu_problem": problem if use_gpu is not False else None,
               "indexes": indexes, "sizes": rows}
    if big and rows[big]["flat_s"]:
        summary[f"speedup_flat_vs_numpy_{big:.0e}".replace("+0", "")] = round(rows[big]["numpy_s"] / rows[big]["flat_s"], 2)
    if big and rows[big]["ivf_s"]:
        summary[f"speedup_ivf_vs_numpy_{big:.0e}".replace("+0", "")] = round(rows[big]["numpy_s"] / rows[big]["ivf_s"], 2)
    summary[f"recall_at_{args.k}_ivf"] = rows[max(sizes)]["recall_at_k_ivf"]
    if args.knn_only:
        print(json.dumps(summary))
        return

    sem = compare_semdedup(args.semdedup_n or max(sizes), args.dim, args.k, args.eps)
    print(f"# SemDeDup vs grads-ray, N={sem['n']:,}, eps={args.eps}, 2% planted near-copies: "
          f"{sem['semdedup_s']} s vs {sem['ours_s']} s; planted found {sem['planted_found_semdedup']} vs "
          f"{sem['planted_found_ours']}; ours keeps {sem['ours_keeps_semdedup_groups']} of SemDeDup's grouped rows "
          f"together, SemDeDup keeps {sem['semdedup_keeps_our_groups']} of ours")
    summary["semdedup"] = sem

    msizes = [int(s) for s in (args.memory_sizes or "10000,100000").split(",")]
    mem = stage_memory(msizes, args.dim, args.k, args.memory_mb)
    print(f"# the similarity stage's driver, peak MB (fresh process; memory_mb={args.memory_mb}):")
    for n in msizes:
        st, im = mem[f"stream_{n}"], mem[f"memory_{n}"]
        print(f"#   N={n:>10,}: streamed {st['peak_mb']:.0f} (from {st['before_mb']:.0f}, {st['seconds']} s, "
              f"{st['index']}), in memory {im['peak_mb']:.0f} ({im['seconds']} s)")
    summary["stage_memory"] = mem
    lo, hi = min(msizes), max(msizes)
    summary[f"driver_peak_growth_{hi:.0e}_over_{lo:.0e}".replace("+0", "")] = round(
        mem[f"stream_{hi}"]["peak_mb"] / mem[f"stream_{lo}"]["peak_mb"], 3)
    summary["in_memory_peak_growth"] = round(mem[f"memory_{hi}"]["peak_mb"] / mem[f"memory_{lo}"]["peak_mb"], 3)
    summary["ivf_pq_bytes_per_vector"] = pq_bytes_per_vector(20_000, args.dim, 32)
    print(json.dumps(summary))


if __name__ == "__main__":
    main()
