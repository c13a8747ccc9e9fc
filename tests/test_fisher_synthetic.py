"""benchmarks/fisher_synthetic.py: its Fisher factors are those of multinomial logistic regression,
and a small run of the experiment completes with both arms measured."""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
from scipy.special import softmax

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))

import fisher_synthetic as fs  # noqa: E402


def test_the_factors_give_the_fisher_information_of_multinomial_logistic_regression():
    """F_iᵀF_i = (diag p − p pᵀ) ⊗ x xᵀ, the Hessian of the negative log-likelihood at θ, in float64
    against a plain Kronecker product, example by example."""
    rng = np.random.default_rng(0)
    x, theta = rng.normal(size=(7, fs.D)), rng.normal(size=(fs.L, fs.D))
    f = fs.factors(x, theta).astype(np.float64)
    for i in range(len(x)):
        p = softmax(theta @ x[i])
        want = np.kron(np.diag(p) - np.outer(p, p), np.outer(x[i], x[i]))
        np.testing.assert_allclose(f[i].T @ f[i], want, atol=1e-6)


def test_the_fit_recovers_the_model_and_a_small_run_measures_both_arms():
    rng = np.random.default_rng(1)
    theta = rng.normal(size=(fs.L, fs.D))
    x = rng.normal(size=(20000, fs.D))
    y = np.array([rng.choice(fs.L, p=p) for p in softmax(x @ theta.T, axis=1)])
    param, pred = fs.errors(fs.fit(x, y), theta, rng.normal(size=(2000, fs.D)))
    assert pred < 0.06 and param < 2.0  # 20,000 examples: close to θ* (up to the softmax's shift)
    out = fs.one_run(0, 300, [60, 120], "true", 50)
    for k in ("greedy_param", "greedy_pred", "uniform_param", "uniform_pred"):
        assert out[k].shape == (2,) and np.isfinite(out[k]).all() and (out[k] > 0).all()
    assert out["greedy_pred"][1] < out["greedy_pred"][0] and out["uniform_pred"][1] < out["uniform_pred"][0]
