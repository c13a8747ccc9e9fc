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

The last line printed is one JSON object with the headline figures.
"""

from __future__ import annotations

import argparse
import json
import os
import platform

import numpy as np
from timing import timed  # benchmarks/timing.py: scripts run as python benchmarks/NAME.py

from grads_ray.similarity.index import IndexSpec, faiss_module, gpu_available, knn, l2_normalize, recall_at_k


def clustered(n: int, d: int, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    centres = rng.normal(size=(1000, d)).astype(np.float32)
    return centres[rng.integers(0, 1000, n)] + 0.7 * rng.normal(size=(n, d)).astype(np.float32)


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


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="N = 10^4, 10^5 on CPU")
    ap.add_argument("--sizes", default=None, help="comma-separated N (default 10000,100000)")
    ap.add_argument("--dim", type=int, default=256)
    ap.add_argument("--k", type=int, default=16)
    ap.add_argument("--nprobe", type=int, default=32)
    ap.add_argument("--numpy-max", type=int, default=100_000)
    args = ap.parse_args()
    sizes = [int(s) for s in (args.sizes or "10000,100000").split(",")]
    faiss = faiss_module()
    gpu = gpu_available(faiss)
    print(f"# similarity benchmark: d={args.dim}, k={args.k}; {platform.machine()}, {os.cpu_count()} cpus, "
          f"faiss {faiss.__version__} ({'gpu' if gpu else 'cpu'})")
    print(f"{'N':>10}{'numpy s':>10}{'flat s':>10}{'ivf s':>10}{'flat x':>9}{'ivf x':>9}{'ivf recall':>12}")
    rows = {}
    for n in sizes:
        x = clustered(n, args.dim, 0)
        ref = t_np = None
        if n <= args.numpy_max:
            ref, t_np = timed(numpy_knn, x, args.k)
        (_, flat_idx, _), t_flat = timed(knn, x, args.k, spec=IndexSpec(kind="flat"))
        (_, ivf_idx, name), t_ivf = timed(knn, x, args.k, spec=IndexSpec(kind="ivf_flat", nprobe=args.nprobe))
        recall = recall_at_k(x, ivf_idx, sample=1000)
        agree = float((np.sort(flat_idx, 1) == np.sort(ref, 1)).mean()) if ref is not None else None
        rows[n] = {"numpy_s": None if t_np is None else round(t_np, 2), "flat_s": round(t_flat, 2),
                   "ivf_s": round(t_ivf, 2), "ivf_index": name, "recall_at_k_ivf": round(recall, 4),
                   "flat_agrees_with_numpy": None if agree is None else round(agree, 5)}
        fx = f"{t_np / t_flat:.1f}" if t_np else "-"
        ix = f"{t_np / t_ivf:.1f}" if t_np else "-"
        print(f"{n:>10,}{(t_np or 0):>10.2f}{t_flat:>10.2f}{t_ivf:>10.2f}{fx:>9}{ix:>9}{recall:>12.4f}")
    big = max(n for n in sizes if rows[n]["numpy_s"]) if any(rows[n]["numpy_s"] for n in sizes) else None
    summary = {"dim": args.dim, "k": args.k, "gpu": gpu, "sizes": rows}
    if big:
        summary[f"speedup_flat_vs_numpy_{big:.0e}".replace("+0", "")] = round(rows[big]["numpy_s"] / rows[big]["flat_s"], 2)
        summary[f"speedup_ivf_vs_numpy_{big:.0e}".replace("+0", "")] = round(rows[big]["numpy_s"] / rows[big]["ivf_s"], 2)
    summary[f"recall_at_{args.k}_ivf"] = rows[max(sizes)]["recall_at_k_ivf"]
    print(json.dumps(summary))


if __name__ == "__main__":
    main()
