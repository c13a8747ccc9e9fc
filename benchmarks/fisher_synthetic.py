"""FisherSFT's own synthetic experiment, reproduced with grads-ray's greedy (issue 22): does the
greedy log-det choice (``grads_ray.selection.fisher.fisher_greedy``) beat uniform sampling as the
paper (arXiv 2505.14826) says?

Multinomial logistic regression with L = 20 classes and d = 10 features, as in the paper's synthetic
setting; what the paper leaves to the reader is fixed here and stated:
- the model θ* (L × d) has N(0, 1) entries; a pool of ``--pool`` examples x ~ N(0, I_d), each with
  a label drawn once from softmax(θ* x);
- FisherSFT's information of an example at θ (the design's plug-in; the true θ* by default, or a fit
  on a uniform pilot sample of ``--pilot`` examples with ``--plugin pilot``): I(x) = (diag(p) − p pᵀ)
  ⊗ x xᵀ, p = softmax(θ x), passed to the greedy as its factor U ⊗ xᵀ (L × L·d, U the symmetric
  square root of diag(p) − p pᵀ), λ = 1, budgets in examples (the greedy's order is a chain: one
  run at the largest budget gives every smaller one as a prefix);
- each subset fits θ̂ by maximum likelihood with a small ridge (1e-3, L-BFGS), compared with θ* up to
  the softmax's invariance (every class's row centred): the parameter error ‖θ̂ − θ*‖_F, and the
  prediction error, the mean total-variation distance between softmax(θ̂ x) and softmax(θ* x) on
  5,000 fresh x;
- ``--runs`` (20) runs, each with its own θ*, pool, labels and uniform draw; means and standard errors.

    python benchmarks/fisher_synthetic.py --quick     # 5 runs, pool 1,000: a CPU minute
    python benchmarks/fisher_synthetic.py             # 20 runs, pool 2,000, budgets 50..800

Prints a table a budget; ``--plot PATH`` draws the errors against n. The last line is one JSON object:
per budget the mean errors of both and ``greedy_over_uniform`` (their ratio: below 1, greedy is better).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
from scipy.optimize import minimize
from scipy.special import log_softmax, softmax

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from grads_ray.selection.fisher import fisher_greedy  # noqa: E402

L, D = 20, 10


def factors(x: np.ndarray, theta: np.ndarray) -> np.ndarray:
    """Each example's Fisher factor at θ: F_i (L, L·d) with F_iᵀF_i = (diag p − p pᵀ) ⊗ x xᵀ.
    (N, d), (L, d) -> (N, L, L·d) float32."""
    p = softmax(x @ theta.T, axis=1)
    cov = np.einsum("nl,lm->nlm", p, np.eye(L)) - p[:, :, None] * p[:, None, :]
    w, v = np.linalg.eigh(cov)
    root = np.einsum("nlk,nk,nmk->nlm", v, np.sqrt(np.clip(w, 0, None)), v)  # symmetric square roots
    return np.einsum("nlm,nd->nlmd", root, x).reshape(len(x), L, L * D).astype(np.float32)


def fit(x: np.ndarray, y: np.ndarray, ridge: float = 1e-3) -> np.ndarray:
    """Maximum likelihood θ̂ (L, d) of multinomial logistic regression, with a small ridge."""
    onehot = np.eye(L)[y]

    def loss(flat: np.ndarray) -> tuple[float, np.ndarray]:
        th = flat.reshape(L, D)
        logits = x @ th.T
        lp = log_softmax(logits, axis=1)
        grad = (softmax(logits, axis=1) - onehot).T @ x + ridge * th
        return float(-(lp * onehot).sum() + 0.5 * ridge * (th ** 2).sum()), grad.ravel()

    return minimize(loss, np.zeros(L * D), jac=True, method="L-BFGS-B").x.reshape(L, D)


def errors(theta_hat: np.ndarray, theta: np.ndarray, x_test: np.ndarray) -> tuple[float, float]:
    """(‖θ̂ − θ*‖_F with every row centred, mean total variation between the two softmaxes)."""
    centre = lambda t: t - t.mean(axis=0, keepdims=True)  # noqa: E731
    param = float(np.linalg.norm(centre(theta_hat) - centre(theta)))
    tv = 0.5 * np.abs(softmax(x_test @ theta_hat.T, axis=1) - softmax(x_test @ theta.T, axis=1)).sum(axis=1)
    return param, float(tv.mean())


def one_run(seed: int, pool: int, budgets: list[int], plugin: str, pilot: int) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    theta = rng.normal(size=(L, D))
    x = rng.normal(size=(pool, D))
    y = np.array([rng.choice(L, p=p) for p in softmax(x @ theta.T, axis=1)])
    x_test = rng.normal(size=(5000, D))
    at = theta if plugin == "true" else fit(x[(pilot_rows := rng.choice(pool, pilot, replace=False))], y[pilot_rows])
    picked, _, _ = fisher_greedy(factors(x, at), np.ones(pool, np.int64), max(budgets), 1.0, seed=seed)
    uniform = rng.permutation(pool)
    out = {k: np.zeros(len(budgets)) for k in ("greedy_param", "greedy_pred", "uniform_param", "uniform_pred")}
    for j, n in enumerate(budgets):
        for name, rows in (("greedy", picked[:n]), ("uniform", uniform[:n])):
            out[f"{name}_param"][j], out[f"{name}_pred"][j] = errors(fit(x[rows], y[rows]), theta, x_test)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="5 runs, pool 1,000, budgets 50..400")
    ap.add_argument("--runs", type=int, default=20)
    ap.add_argument("--pool", type=int, default=2000)
    ap.add_argument("--budgets", default="50,100,200,400,800")
    ap.add_argument("--plugin", choices=("true", "pilot"), default="true", help="θ at which the information is taken")
    ap.add_argument("--pilot", type=int, default=200, help="uniform pilot sample for --plugin pilot")
    ap.add_argument("--plot", default=None, help="write the errors-against-n figure here (PNG)")
    a = ap.parse_args()
    if a.quick:
        a.runs, a.pool, a.budgets = 5, 1000, "50,100,200,400"
    budgets = [int(b) for b in a.budgets.split(",")]
    if max(budgets) > a.pool:
        ap.error("the largest budget exceeds the pool")
    t0 = time.perf_counter()
    runs = [one_run(s, a.pool, budgets, a.plugin, a.pilot) for s in range(a.runs)]
    stat = {k: (np.mean([r[k] for r in runs], axis=0), np.std([r[k] for r in runs], axis=0) / np.sqrt(a.runs))
            for k in runs[0]}
    print(f"# FisherSFT synthetic: L={L}, d={D}, pool {a.pool:,}, {a.runs} runs, information at θ {a.plugin}; "
          f"{time.perf_counter() - t0:.0f} s")
    print(f"{'n':>6}{'param greedy':>16}{'param uniform':>16}{'pred greedy':>15}{'pred uniform':>15}{'pred ratio':>12}")
    rows = {}
    for j, n in enumerate(budgets):
        g, u = stat["greedy_pred"][0][j], stat["uniform_pred"][0][j]
        rows[n] = {k: [round(float(stat[k][0][j]), 5), round(float(stat[k][1][j]), 5)] for k in stat}
        rows[n]["greedy_over_uniform_pred"] = round(float(g / u), 4)
        rows[n]["greedy_over_uniform_param"] = round(float(stat["greedy_param"][0][j] / stat["uniform_param"][0][j]), 4)
        print(f"{n:>6}{stat['greedy_param'][0][j]:>10.3f} ±{stat['greedy_param'][1][j]:.3f}"
              f"{stat['uniform_param'][0][j]:>10.3f} ±{stat['uniform_param'][1][j]:.3f}"
              f"{g:>9.4f} ±{stat['greedy_pred'][1][j]:.4f}{u:>9.4f} ±{stat['uniform_pred'][1][j]:.4f}{g / u:>12.3f}")
    if a.plot:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        fig, axes = plt.subplots(1, 2, figsize=(9, 3.4))
        for ax, what, label in ((axes[0], "pred", "prediction error (mean TV)"), (axes[1], "param", "‖θ̂ − θ*‖_F")):
            for name, style in (("greedy", "o-"), ("uniform", "s--")):
                m, se = stat[f"{name}_{what}"]
                ax.errorbar(budgets, m, yerr=se, fmt=style, label="FisherSFT greedy" if name == "greedy" else "uniform")
            ax.set_xscale("log")
            ax.set_yscale("log")
            ax.set_xticks(budgets, [str(b) for b in budgets])
            ax.minorticks_off()
            ax.set_xlabel("n (examples)")
            ax.set_ylabel(label)
        axes[0].legend(fontsize=8)
        fig.suptitle(f"multinomial logistic regression, L={L}, d={D}, {a.runs} runs (mean ± s.e.)", fontsize=9)
        fig.tight_layout()
        fig.savefig(a.plot, dpi=110)
    print(json.dumps({"classes": L, "features": D, "pool": a.pool, "runs": a.runs, "plugin": a.plugin,
                      "budgets": rows}))


if __name__ == "__main__":
    main()
