"""FisherSFT (arXiv 2505.14826): greedy information gain on last-layer features.

The model is linearised at its last layer: predicting each response token is a multinomial logistic
regression on the last hidden state h_t, whose Hessian is bounded by Σ_t h_t h_tᵀ (times the softmax
covariance, ‖diag(p) − ppᵀ‖ ≤ 1). The score stage keeps each example's Σ_t z_t z_tᵀ (z = P h, P a
fixed d' × d Gaussian) as a rank-r factor F_i (r × d'), F_iᵀF_i ≈ Σ_t z_t z_tᵀ. A subset S is worth

    f(S) = log det(λI + Σ_{i∈S} F_iᵀF_i),

and adding i to S with A = λI + Σ_S F_jᵀF_j gains, by the matrix determinant lemma,

    Δ_i(A) = log det(I_r + F_i A⁻¹ F_iᵀ)          (an r × r determinant, not d' × d'),

after which A⁻¹ is updated by Woodbury: A⁻¹ ← A⁻¹ − A⁻¹F_iᵀ(I_r + F_iA⁻¹F_iᵀ)⁻¹F_iA⁻¹ (O(d'²r)).
f is monotone submodular (Δ_i(A) only shrinks as A grows), so lazy greedy is exact: a gain computed
at an earlier A is an upper bound, and a candidate whose fresh gain beats every other bound is the
greedy choice (Minoux 1978). Under a token budget the greedy ratio is Δ_i / tokens_i.

Cost: O(N·r·d') for the first gains; each pick O(m·r·d'² + d'²r) for the m stale candidates it
re-evaluates (m small in practice: lazy greedy rarely looks past the first few); memory N·r·d'.
``batch > 1`` accepts gains up to batch − 1 picks old (an approximation that trades exactness for
fewer evaluations). Runs on a CUDA device when given one; the factors stay in their stored
precision and every gain and update is computed in float64.
"""

from __future__ import annotations

import warnings

import numpy as np
import torch

POOL = 4096  # candidates kept in the working pool, refilled from the bound-sorted tail
REEVALUATE = 32  # stale candidates re-evaluated at once
REFRESH_EVERY = 256  # picks between recomputing A⁻¹ from A (keeps Woodbury's rounding in check)


def gains(factors: torch.Tensor, a_inv: torch.Tensor) -> torch.Tensor:
    """Δ_i = log det(I_r + F_i A⁻¹ F_iᵀ) for a batch. (m, r, d'), (d', d') -> (m,) float64."""
    factors = factors.to(torch.float64)
    m = factors @ a_inv @ factors.transpose(1, 2)  # (m, r, r), symmetric PSD
    eye = torch.eye(m.shape[-1], dtype=m.dtype, device=m.device)
    return torch.linalg.slogdet(eye + m)[1]


class Factors:
    """The factors the greedy reads: a tensor on the device when they are in memory, or read row by
    row from a memory-mapped array (``np.memmap``, the select stage's spill for corpora whose
    factors do not fit), so N·r·d' floats never have to sit in memory at once. (N, r, d')."""

    def __init__(self, factors: np.ndarray, dev: torch.device):
        self.dev, self.shape = dev, tuple(factors.shape)
        self.mapped = factors if isinstance(factors, np.memmap) else None
        if self.mapped is None:  # kept in their stored precision (float32: N·r·d'·4 bytes)
            with warnings.catch_warnings():  # Arrow-backed arrays are read-only; nothing here writes to them
                warnings.filterwarnings("ignore", message="The given NumPy array is not writable")
                self.tensor = torch.as_tensor(np.ascontiguousarray(factors)).to(dev)

    def __len__(self) -> int:
        return self.shape[0]

    def rows(self, idx: np.ndarray) -> torch.Tensor:
        """Rows ``idx`` (numpy indices) on the device. (m,) -> (m, r, d')."""
        idx = np.ascontiguousarray(idx, dtype=np.int64)
        if self.mapped is None:
            return self.tensor[torch.from_numpy(idx).to(self.dev)]
        order = np.argsort(idx, kind="stable")  # read the file in order, hand the rows back as asked
        got = np.empty((len(idx), *self.shape[1:]), np.float32)
        got[order] = self.mapped[idx[order]]
        return torch.from_numpy(got).to(self.dev)

    def block(self, start: int, stop: int) -> torch.Tensor:
        """Rows ``[start, stop)`` on the device."""
        if self.mapped is None:
            return self.tensor[start:stop]
        return torch.from_numpy(np.array(self.mapped[start:stop], np.float32)).to(self.dev)  # a copy: the map is read-only


def log_det_objective(factors: np.ndarray, chosen: np.ndarray, lam: float) -> float:
    """f(S) = log det(λI + Σ_{i∈S} F_iᵀF_i), directly (float64). For tests and reports."""
    f = np.asarray(factors, dtype=np.float64)[np.asarray(chosen, dtype=np.int64)]
    d = f.shape[-1] if f.ndim == 3 else np.asarray(factors).shape[-1]
    a = lam * np.eye(d) + np.einsum("nri,nrj->ij", f, f)
    return float(np.linalg.slogdet(a)[1])


class _State:
    """A = λI + Σ_S F_iᵀF_i and A⁻¹, updated by Woodbury after each pick (recomputed every
    REFRESH_EVERY picks to keep rounding in check)."""

    def __init__(self, d: int, lam: float, dev: torch.device):
        self.a = lam * torch.eye(d, dtype=torch.float64, device=dev)
        self.a_inv = torch.eye(d, dtype=torch.float64, device=dev) / lam
        self.picks = 0

    def add(self, fi: torch.Tensor) -> None:
        """Add F_i (r, d') or several stacked (b·r, d')."""
        self.a += fi.T @ fi
        self.picks += 1
        if self.picks % REFRESH_EVERY == 0:
            self.a_inv = torch.linalg.inv(self.a)
            return
        u = self.a_inv @ fi.T  # (d', r)
        core = torch.eye(fi.shape[0], dtype=fi.dtype, device=fi.device) + fi @ u
        self.a_inv = self.a_inv - u @ torch.linalg.solve(core, u.T)


def fisher_greedy(factors: np.ndarray, cost: np.ndarray, limit: int, lam: float, *,
                  order0: np.ndarray | None = None, eligible: np.ndarray | None = None,
                  group: np.ndarray | None = None, group_limits: dict | None = None,
                  epsilon: float = 0.0, batch: int = 1, seed: int = 0,
                  device: str = "cpu") -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Greedy log-det selection under a budget.

    ``epsilon`` = 0: lazy greedy, exact (for ``batch`` = 1). ``epsilon`` > 0: stochastic greedy
    (Mirzasoleiman et al. 2015, "Lazier than lazy greedy"): each pick takes the best of a seeded
    sample of s = ⌈N/K · ln(1/ε)⌉ remaining candidates, (1 − 1/e − ε)-optimal in expectation, O(N
    ln(1/ε)) gain evaluations in all, for corpora where lazy greedy's bounds stay close together
    (homogeneous features make it re-evaluate most of the pool at every pick).
    ``batch`` > 1 accepts up to that many picks per round of evaluations (approximate).

    factors (N, r, d'), in memory or an ``np.memmap`` (read a few rows at a time); cost (N,) int (1 per example, or tokens); ``limit`` the budget in the same
    unit; ``order0`` breaks ties (default: index order); ``eligible`` (N,) bool; ``group`` and
    ``group_limits`` (per-group budgets in the same unit). A candidate that no longer fits is
    dropped, a later smaller one may still fit.
    -> (picked indices in order (K,), their gains when picked (K,), each example's gain alone (N,)).
    """
    n = len(factors)
    dev = torch.device(device)
    f = Factors(factors, dev)  # every gain is computed in float64
    cost_np = np.asarray(cost, dtype=np.int64)
    gain0 = np.zeros(n)
    state = _State(f.shape[2], lam, dev)
    for s in range(0, n, 1 << 16):
        gain0[s:s + (1 << 16)] = gains(f.block(s, s + (1 << 16)), state.a_inv).cpu().numpy()
    ok = np.ones(n, bool) if eligible is None else np.asarray(eligible, bool).copy()
    ok &= cost_np <= limit
    tie = np.arange(n) if order0 is None else np.argsort(np.asarray(order0))  # position in order0
    budget = _Budget(cost_np, limit, group, group_limits)
    if epsilon > 0:
        picked, picked_gain = _stochastic(f, cost_np, ok, tie, budget, state, epsilon, batch, seed)
    else:
        picked, picked_gain = _lazy(f, cost_np, ok, gain0, tie, budget, state, batch)
    return np.asarray(picked, np.int64), np.asarray(picked_gain), gain0


class _Budget:
    """What is left of the total and of each group's limit."""

    def __init__(self, cost: np.ndarray, limit: int, group: np.ndarray | None, group_limits: dict | None):
        self.cost, self.left = cost, int(limit)
        self.group = np.asarray(group) if group is not None and group_limits is not None else None
        self.group_left = {g: int(v) for g, v in (group_limits or {}).items()} if self.group is not None else None

    def fits(self, i: int) -> bool:
        c = int(self.cost[i])
        if c > self.left:
            return False
        return self.group_left is None or self.group_left.get(self.group[i], self.left) >= c

    def spend(self, i: int) -> None:
        c = int(self.cost[i])
        self.left -= c
        if self.group_left is not None and self.group[i] in self.group_left:
            self.group_left[self.group[i]] -= c


def _lazy(f, cost, ok, gain0, tie, budget: _Budget, state: _State, batch: int):
    """Lazy greedy over a working pool of the highest bounds, refilled from the bound-sorted rest
    (whose bounds, never re-evaluated, are their gains alone)."""
    n = len(cost)
    ub = np.where(ok, gain0 / np.maximum(cost, 1), -np.inf)
    sorted_all = np.lexsort((tie, -ub))
    sorted_all = sorted_all[ok[sorted_all]]
    stamp = np.full(n, -(1 << 40), np.int64)  # picks made when the bound was computed
    picked, picked_gain = [], []
    pool = np.zeros(0, np.int64)
    ptr, m = 0, REEVALUATE
    while budget.left > 0:
        live = ub[pool] > -np.inf
        if not live.all():
            pool = pool[live]
        tail_best = ub[sorted_all[ptr]] if ptr < len(sorted_all) else -np.inf
        if len(pool) == 0 or ub[pool].max() < tail_best:
            if ptr >= len(sorted_all):
                break
            pool = np.concatenate([pool, sorted_all[ptr:ptr + POOL]])
            ptr += POOL
            continue
        pub = ub[pool]
        j = int(np.argmax(pub))  # first maximum: the pool keeps the tie-break order among equal bounds
        i = int(pool[j])
        if not budget.fits(i):
            ub[i] = -np.inf
            continue
        if state.picks - stamp[i] < batch:  # fresh enough: the greedy choice
            picked.append(i)
            picked_gain.append(ub[i] * max(int(cost[i]), 1))
            ub[i] = -np.inf
            budget.spend(i)
            state.add(f.rows(np.array([i]))[0].to(torch.float64))
            m = REEVALUATE
            continue
        # re-evaluate the stale candidates with the highest bounds (always including i); a miss
        # doubles how many are re-evaluated next time
        k = min(m, len(pool))
        top = np.argpartition(-pub, k - 1)[:k] if k < len(pool) else np.arange(len(pool))
        cand = pool[top]
        fresh = gains(f.rows(cand), state.a_inv).cpu().numpy()
        ub[cand] = fresh / np.maximum(cost[cand], 1)
        stamp[cand] = state.picks
        m = min(2 * m, POOL)
    return picked, picked_gain


def _stochastic(f, cost, ok, tie, budget: _Budget, state: _State, epsilon: float, batch: int, seed: int):
    """Stochastic greedy: candidates visited in a seeded random order, a window of s at a time."""
    n_ok = int(ok.sum())
    if n_ok == 0:
        return [], []
    k_est = max(1, min(n_ok, int(budget.left / max(cost[ok].mean(), 1))))
    s = int(min(n_ok, np.ceil(n_ok / k_est * np.log(1 / epsilon))))
    rng = np.random.default_rng(seed)
    perm = rng.permutation(np.flatnonzero(ok))
    alive = ok.copy()
    picked, picked_gain = [], []
    pos, window = 0, s * batch
    while budget.left > 0:
        if pos >= len(perm):  # a pass is over: drop the picked and the dropped, shuffle again
            perm, pos = rng.permutation(perm[alive[perm]]), 0
            if not len(perm):
                break
        cand = perm[pos:pos + window]
        pos += window
        cand = cand[alive[cand]]
        if not len(cand):
            continue
        g = gains(f.rows(cand), state.a_inv).cpu().numpy() / np.maximum(cost[cand], 1)
        best = np.lexsort((tie[cand], -g))[:batch]
        for b in best.tolist():
            i = int(cand[b])
            alive[i] = False
            if not budget.fits(i):
                continue
            picked.append(i)
            picked_gain.append(g[b] * max(int(cost[i]), 1))
            budget.spend(i)
            state.add(f.rows(np.array([i]))[0].to(torch.float64))
    return picked, picked_gain


def brute_force_greedy(factors: np.ndarray, k: int, lam: float) -> list[int]:
    """Plain greedy for tests: at each step evaluate f(S ∪ {i}) for every i by a full d' × d'
    log-determinant (float64), take the best (lowest index on ties)."""
    f = np.asarray(factors, dtype=np.float64)
    d = f.shape[-1]
    a = lam * np.eye(d)
    chosen: list[int] = []
    for _ in range(min(k, len(f))):
        best, best_val = -1, -np.inf
        for i in range(len(f)):
            if i in chosen:
                continue
            val = np.linalg.slogdet(a + f[i].T @ f[i])[1]
            if val > best_val + 1e-12:
                best, best_val = i, val
        chosen.append(best)
        a = a + f[best].T @ f[best]
    return chosen


def fisher_lambda(factors: np.ndarray, setting: str) -> float:
    """λ for FisherSFT: a number, or ``auto`` = mean_i tr(F_iᵀF_i) / d' (one average example's
    information per dimension), so the prior weighs as much as one example whatever the scale."""
    if setting != "auto":
        return float(setting)
    n = len(factors)
    total = 0.0
    for s in range(0, n, 1 << 16):  # in blocks: the factors may be a memory-mapped spill
        f = np.asarray(factors[s:s + (1 << 16)])
        total += float(np.einsum("nrd,nrd->", f, f, dtype=np.float64))
    lam = total / (n * factors.shape[-1]) if n else 1.0
    return lam if lam > 0 else 1.0
