"""Selection at corpus scale: every method on N rows of synthetic statistics, timed against a floor
measured in the same run.

The floor is one ``np.argsort`` of a float64 column of N rows: any method that ranks the corpus pays
at least that. Each method runs the whole of ``grads_ray.selection.choose.select`` (seeded id hashes,
scores, band, cluster quotas, duplicate caps, per-source quotas, the budget walk) and reports
seconds, seconds per 10^6 rows, and its ratio to the floor. FisherSFT works on (N, r, d') factors,
so it is measured on fewer rows (``--fisher-rows``), both exactly (lazy greedy, on ``--exact-rows``)
and with stochastic greedy (ε = 0.01), with the log-det objective each reaches.

The data has the shapes of a real stats table: log-normal magnitudes per layer group correlated
through a per-example scale, signed means, three sources, k-NN lists, clusters and near-duplicate
pairs; the numbers do not matter to the timings, only the shapes and sizes do.

    python benchmarks/selection.py --quick          # 10^6 rows: a few CPU minutes
    python benchmarks/selection.py                  # 10^7 rows (about 8 GB of memory)

The last line printed is one JSON object with the headline figures.
"""

from __future__ import annotations

import argparse
import json
import platform

import numpy as np
import pyarrow as pa
from timing import timed  # benchmarks/timing.py: scripts run as python benchmarks/NAME.py

from grads_ray.columns import id_hash
from grads_ray.config import FisherConfig, SelectConfig
from grads_ray.selection.budget import Budget
from grads_ray.selection.choose import select
from grads_ray.selection.fisher import fisher_lambda, log_det_objective
from grads_ray.selection.inputs import SelectionInputs

METHODS = ["grads", "random", "loss", "grad_norm", "ifd", "less"]


def synthetic(n: int, seed: int, proj_dim: int = 32, k: int = 10) -> dict:
    """Stats, similarity arrays, ids, sources and projected gradients for n examples."""
    rng = np.random.default_rng(seed)
    scale = rng.normal(0, 1, n)
    cols = {"loss": rng.gamma(2.0, 1.0, n), "n_tokens": rng.integers(16, 1024, n),
            "loss_response_only": rng.gamma(2.0, 1.2, n), "grad_norm": np.exp(scale + rng.normal(0, 0.3, n))}
    for g in ("embedding", "head"):
        for s in ("grad_norm", "grad_std", "grad_max"):
            cols[f"{g}.{s}"] = np.exp(scale + rng.normal(0, 0.5, n))
        cols[f"{g}.grad_min"] = -np.exp(scale + rng.normal(0, 0.5, n))
        cols[f"{g}.grad_mean"] = rng.normal(0, 1e-4, n)
    ids = pa.array(np.char.add("ex", np.arange(n).astype("U9")).astype(object), pa.string())
    clusters = max(1, min(1024, int(round(n ** 0.5))))
    groups = np.arange(n)
    pairs = rng.choice(n, size=(n // 50, 2), replace=False) if n >= 100 else np.zeros((0, 2), np.int64)
    groups[pairs[:, 1]] = pairs[:, 0]
    sim = {"dup_group": groups, "diversity": rng.random(n).astype(np.float32),
           "cluster": rng.integers(0, clusters, n), "nn_idx": rng.integers(0, n, (n, k)),
           "nn_sims": rng.random((n, k), dtype=np.float32)}
    return {"cols": cols, "ids": ids, "similarity": sim,
            "source": np.array(["law.jsonl", "medicine.jsonl", "finance.jsonl"], dtype=object)[rng.integers(0, 3, n)],
            "grad_proj": rng.normal(size=(n, proj_dim)).astype(np.float32),
            "target_proj": rng.normal(size=(64, proj_dim)).astype(np.float32)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="10^6 rows, FisherSFT on 10^5")
    ap.add_argument("--rows", type=int, help="rows of statistics (default 10^7, --quick 10^6)")
    ap.add_argument("--fisher-rows", type=int, help="rows for FisherSFT (default 10^6, --quick 10^5)")
    ap.add_argument("--exact-rows", type=int, default=20_000, help="rows for exact lazy-greedy FisherSFT")
    ap.add_argument("--budget", default="5%")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    n = args.rows or (10**6 if args.quick else 10**7)
    nf = args.fisher_rows or (10**5 if args.quick else 10**6)
    from grads_ray.selection.budget import parse_budget

    budget = parse_budget(args.budget)
    print(f"# selection benchmark: {n:,} rows, budget {args.budget}; {platform.machine()}, "
          f"{__import__('os').cpu_count()} cpus; numpy {np.__version__}")
    data, t_gen = timed(synthetic, n, args.seed)
    print(f"synthetic data: {t_gen:.1f} s")
    _, floor = timed(np.argsort, data["cols"]["loss"])
    _, t_hash = timed(id_hash, data["ids"], args.seed)
    print(f"floor (argsort of one column): {floor:.2f} s; id hash: {t_hash:.2f} s")
    print(f"{'method':<12}{'budget':>10}{'seconds':>10}{'s/1e6 rows':>12}{'x floor':>10}{'selected':>12}")
    results: dict[str, dict] = {}
    for method in METHODS:
        for quotas in ({}, {"law.jsonl": 0.5, "*": 0.5}):
            cfg = SelectConfig(method=method, quotas=quotas)
            inputs = SelectionInputs(data["cols"], data["ids"], source=data["source"],
                                     similarity=data["similarity"] if method == "grads" else None)
            if method == "less":
                inputs.grad_proj, inputs.target_proj = data["grad_proj"], data["target_proj"]
            res, sec = timed(select, inputs, budget, cfg, args.seed)
            name = method + ("+quotas" if quotas else "")
            results[name] = {"seconds": round(sec, 2), "seconds_per_1e6_rows": round(sec / n * 1e6, 3),
                             "x_floor": round(sec / floor, 1), "selected": int(res["selected"].sum())}
            print(f"{name:<12}{args.budget:>10}{sec:>10.2f}{sec / n * 1e6:>12.3f}{sec / floor:>10.1f}"
                  f"{int(res['selected'].sum()):>12,}")
            del res
    tok = Budget("tokens", int(data["cols"]["n_tokens"].sum() * 0.05))
    res, sec = timed(select, SelectionInputs(data["cols"], data["ids"], source=data["source"],
                                             similarity=data["similarity"]), tok, SelectConfig(method="grads"), args.seed)
    results["grads(tokens)"] = {"seconds": round(sec, 2), "seconds_per_1e6_rows": round(sec / n * 1e6, 3)}
    print(f"{'grads':<12}{'5% tok':>10}{sec:>10.2f}{sec / n * 1e6:>12.3f}{sec / floor:>10.1f}"
          f"{int(res['selected'].sum()):>12,}")
    del data, res

    rng = np.random.default_rng(args.seed)
    fisher: dict[str, dict] = {}
    for label, rows, eps in (("exact", args.exact_rows, "0"), ("stochastic", args.exact_rows, "0.01"),
                             ("stochastic", nf, "0.01")):
        f = rng.normal(size=(rows, 4, 64)).astype(np.float32) * rng.lognormal(0, 0.5, (rows, 1, 1)).astype(np.float32)
        cols = {"loss": np.zeros(rows), "n_tokens": np.ones(rows, np.int64)}
        ids = pa.array([f"f{i}" for i in range(rows)])
        cfg = SelectConfig(method="fisher", fisher=FisherConfig(epsilon=eps))
        res, sec = timed(select, SelectionInputs(cols, ids, fisher_factors=f), budget, cfg, args.seed)
        lam = fisher_lambda(f, "auto")
        gain = log_det_objective(f, np.flatnonzero(res["selected"]), lam) - log_det_objective(f, [], lam)
        key = f"fisher_{label}@{rows}"
        fisher[key] = {"seconds": round(sec, 2), "seconds_per_1e6_rows": round(sec / rows * 1e6, 2),
                       "picks": int(res["selected"].sum()), "log_det_gain": round(gain, 3)}
        print(f"{key:<28}{sec:>8.2f} s{sec / rows * 1e6:>10.2f} s/1e6 rows  picks {fisher[key]['picks']:,}"
              f"  log-det gain {gain:.3f}")
    ex, st = fisher[f"fisher_exact@{args.exact_rows}"], fisher[f"fisher_stochastic@{args.exact_rows}"]
    summary = {"rows": n, "budget": args.budget, "floor_seconds": round(floor, 3), "id_hash_seconds": round(t_hash, 2),
               "seconds_per_1e6_rows": {k: v["seconds_per_1e6_rows"] for k, v in {**results, **fisher}.items()},
               "x_floor": {k: v["x_floor"] for k, v in results.items() if "x_floor" in v},
               "max_method_seconds": max(v["seconds"] for v in results.values()),
               "fisher_stochastic_vs_exact_gain": round(st["log_det_gain"] / ex["log_det_gain"], 4),
               "fisher_stochastic_vs_exact_speed": round(ex["seconds"] / max(st["seconds"], 1e-9), 1)}
    print(json.dumps(summary))


if __name__ == "__main__":
    main()
