"""Per-example gradient statistics from factors, without ever holding a whole per-example gradient.

Every supported parameter's per-example gradient is a sum over the example's tokens of outer
products, G_i = Σ_t l_{i,t} ⊗ r_{i,t}, in the parameter's storage layout (rows × cols):

- ``Dense(left, right)``: left (B, T, R), right (B, T, C). A linear layer y = x Wᵀ stores W as
  (out, in): left = output gradients δ, right = inputs a. GPT-2's Conv1D (y = x W, W (in, out)) has
  them swapped. A tied LM head is a Dense term of the embedding matrix.
- ``Rows(index, right)``: index (B, T) long, -1 where the token does not count; the left factor is
  the one-hot row e_index. An embedding lookup W[index] has right = δ.
- a vector parameter (norm weight, bias) has its per-example gradient (B, n) formed directly.

Several terms of one parameter (a weight tied between embedding and head) add up. Padding and
masked positions must already be zero in the factors (index -1).

Per example i this yields the parameter's ``Moments``: entry sum, sum of squares, max and min. The
sum is Σ_t (Σ l_t)(Σ r_t): no per-example gradient needed. The sum of squares is either the ghost
norm Σ_{t,s} (l_t·l_s)(r_t·r_s) (cost ~ T²(R+C)) or read off the formed G_i (cost ~ T·R·C); max and
min need the entries, so G_i is formed a block of rows at a time and reduced on the fly.
Reductions run in ``acc`` dtype (float32, or float64 for a float64 model) along a row, and in float64
across rows; per-example results are float64.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class Dense:
    left: torch.Tensor  # (B, T, R)
    right: torch.Tensor  # (B, T, C)


@dataclass
class Rows:
    index: torch.Tensor  # (B, T) long, -1 = no contribution
    right: torch.Tensor  # (B, T, C)


@dataclass
class Moments:
    """Per-example entry statistics of one parameter's (or a group's) gradient, each (B,) float64."""

    n: int  # entries per example
    s: torch.Tensor  # Σ g
    ss: torch.Tensor  # Σ g²
    mx: torch.Tensor  # max g (NaN when extrema are not computed)
    mn: torch.Tensor  # min g

    def merge(self, other: Moments) -> Moments:
        return Moments(self.n + other.n, self.s + other.s, self.ss + other.ss,
                       torch.fmax(self.mx, other.mx), torch.fmin(self.mn, other.mn))

    def finish(self) -> dict[str, torch.Tensor]:
        """``grad_norm, grad_mean, grad_std`` (population), ``grad_max, grad_min``, each (B,)."""
        mean = self.s / self.n
        var = (self.ss / self.n - mean * mean).clamp(min=0.0)
        return {"grad_norm": self.ss.sqrt(), "grad_mean": mean, "grad_std": var.sqrt(),
                "grad_max": self.mx, "grad_min": self.mn}


HALF = (torch.float16, torch.bfloat16)
# How a half-precision matrix product returns float32, per device type: "native" (``out_dtype``: CUDA,
# torch >= 2.8), "emulate" (the factors cast to float32 first: the same exact products and float32
# sums; the tests use it to run the half path on a CPU), or absent: the factors are cast to float32.
HALF_OUT: dict[str, str] = {"cuda": "native"}
_NATIVE_OK: dict[str, bool] = {}


def half_out(x: torch.Tensor) -> bool:
    """Whether products of x (half precision) with a split sketch (:func:`split_half`) are taken in x's
    own dtype with float32 results, instead of casting x to float32 first: the cast writes and reads
    back twice x's bytes, and x is every stacked factor of the pass."""
    how = HALF_OUT.get(x.device.type)
    if x.dtype not in HALF or how is None:
        return False
    if how == "native" and str(x.device) not in _NATIVE_OK:  # once per device: a torch without out_dtype says so
        probe = torch.ones((1, 2, 2), dtype=x.dtype, device=x.device)
        try:
            _NATIVE_OK[str(x.device)] = (torch.bmm(probe, probe, out_dtype=torch.float32).dtype == torch.float32
                                         and torch.mm(probe[0], probe[0], out_dtype=torch.float32).dtype == torch.float32)
        except (TypeError, RuntimeError, NotImplementedError):
            _NATIVE_OK[str(x.device)] = False
        into = torch.empty((2, 2), dtype=torch.float32, device=x.device)
        try:  # the same with ``out=`` (:func:`half_matmul`'s ``out``; else a copy into it), and right
            _NATIVE_OK[f"{x.device}:into"] = (torch.mm(probe[0], probe[0], out_dtype=torch.float32, out=into) is into
                                              and bool((into == 2).all()))
        except (TypeError, RuntimeError, NotImplementedError):
            _NATIVE_OK[f"{x.device}:into"] = False
    return how == "emulate" or _NATIVE_OK[str(x.device)]


def split_half(p: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """A float sketch matrix, p (…, R, k), as two ``dtype`` halves side by side, (…, R, 2k): its rounding
    to ``dtype`` and the rounding of what that missed. hi + lo is p within 2^-16 of its size in bfloat16
    (2^-22 in float16): x @ hi + x @ lo is x @ p to that, with x in ``dtype`` and nothing cast."""
    hi = p.to(dtype)
    lo = (p - hi.to(p.dtype)).to(dtype)
    return torch.cat([hi, lo], dim=-1)


def half_matmul(x: torch.Tensor, split: torch.Tensor, halves: bool = False,
                out: torch.Tensor | None = None) -> torch.Tensor:
    """x (…, R) in half precision times a :func:`split_half` matrix (R, 2k) -> (…, k) float32, or x
    (N, M, R) times (N, R, 2k) -> (N, M, k):
    exact products, float32 sums (CUDA's ``out_dtype``), the two halves added in float32 (``halves``:
    not yet added, (…, 2k), for a caller that adds many at once; then ``out``, contiguous float32
    (…, 2k), takes the product where given: a stack's members written in place, no stacking copy)."""
    if HALF_OUT.get(x.device.type) == "emulate":
        out = torch.matmul(x.float(), split.float(), **({"out": out} if halves and out is not None else {}))
    elif split.dim() == 2:  # one matrix for every row of x
        into = halves and out is not None
        if into and not _NATIVE_OK.get(f"{x.device}:into"):  # a torch whose mm takes no out= with out_dtype
            return out.copy_(half_matmul(x, split, halves=True))
        kw = {"out": out.view(-1, out.shape[-1])} if into else {}
        out = torch.mm(x.reshape(-1, x.shape[-1]), split, out_dtype=torch.float32, **kw).view(*x.shape[:-1], -1)
    else:  # x (N, M, R), split (N, R, 2k)
        got = torch.bmm(x, split, out_dtype=torch.float32)
        out = out.copy_(got) if halves and out is not None else got
    if halves:
        return out
    k = out.shape[-1] // 2
    return out[..., :k] + out[..., k:]


def fused_usable(terms: list[Dense | Rows]) -> bool:
    """Whether ``gradients.fused``'s kernel takes these terms: every factor of one dtype it takes, where it runs."""
    from grads_ray.gradients import fused

    tensors = [x for t in terms for x in ((t.left, t.right) if isinstance(t, Dense) else (t.right,))]
    return len({x.dtype for x in tensors}) == 1 and fused.usable(tensors[0])


def acc_dtype(t: torch.Tensor) -> torch.dtype:
    """The dtype reductions run in: float64 for float64 input, else float32."""
    return torch.float64 if t.dtype == torch.float64 else torch.float32


def _f64(t: torch.Tensor) -> torch.Tensor:
    return t.to(torch.float64)


def row_sums(g: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """g (B, n) formed -> its rows' entry sum and sum of squares, (B,) float64 each (squares in ``acc_dtype``)."""
    acc = g.to(acc_dtype(g))
    return acc.sum(1, dtype=torch.float64), (acc * acc).sum(1, dtype=torch.float64)


def vector_moments(g: torch.Tensor, extrema: bool = True) -> Moments:
    """Per-example gradient of a vector parameter, g (B, n), formed already."""
    s, ss = row_sums(g)
    if not extrema:
        nan = torch.full((g.shape[0],), torch.nan, dtype=torch.float64, device=g.device)
        return Moments(g.shape[1], s, ss, nan, nan)
    return Moments(g.shape[1], s, ss, _f64(g.amax(1)), _f64(g.amin(1)))


def entry_sum(terms: list[Dense | Rows]) -> torch.Tensor:
    """Σ of G_i's entries, (B,) float64: Σ_t (Σ_r l_t)(Σ_c r_t); a one-hot row sums to 1."""
    total = None
    for term in terms:
        acc = acc_dtype(term.right)
        rsum = term.right.sum(-1, dtype=acc)  # (B, T)
        lsum = term.left.sum(-1, dtype=acc) if isinstance(term, Dense) else (term.index >= 0).to(acc)
        part = (lsum * rsum).sum(1, dtype=torch.float64)  # rows' products in acc, their sum in float64
        total = part if total is None else total + part
    return total


def ghost_sumsq(terms: list[Dense]) -> torch.Tensor:
    """‖Σ_terms G_i‖²_F = Σ_{t,s} (l_t·l_s)(r_t·r_s) over the terms' tokens side by side, (B,) float64.
    Memory (B, T, T); cost ~ B·T²·(R + C)."""
    left = torch.cat([t.left for t in terms], dim=1)
    right = torch.cat([t.right for t in terms], dim=1)
    acc = acc_dtype(right)
    gl = torch.bmm(left.to(acc), left.to(acc).transpose(1, 2))  # (B, T, T)
    gr = torch.bmm(right.to(acc), right.to(acc).transpose(1, 2))
    return _f64((gl * gr).sum(2)).sum(1)  # rows in acc, then float64 across them


def ghost_cheaper(tokens: int, rows: int, cols: int) -> bool:
    """The "mixed" rule: the ghost norm costs ~T²(R+C), forming G_i costs ~T·R·C."""
    return tokens * (rows + cols) < rows * cols


def block_extrema(block: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Max and min of each example's entries: block (B, …) -> (B,) each. One read on a GPU
    (``aminmax``); on the CPU ``amax`` and ``amin`` apart, since the CPU's ``aminmax`` is not
    vectorised (10-40x slower than the two on (16, 896, 896) float32, torch 2.13)."""
    flat = block.flatten(1)
    if block.device.type == "cpu":
        return flat.amax(1), flat.amin(1)
    lo, hi = torch.aminmax(flat, dim=1)
    return hi, lo


def block_moments(block: torch.Tensor, acc: torch.dtype, extrema: bool
                  ) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
    """One block of formed rows, block (B, r, C) -> per example its sum of squares, max and min,
    (B,) float64 each (None without extrema). Each row's squares in ``acc``, then float64 across
    rows: one float32 sum over millions of entries (a vocabulary-sized head) drifts by 1e-4
    relative, which the self-check would see. Called by name from :func:`formed_moments`, so a
    benchmark can swap in a compiled copy (``grad_stats.py --compile``)."""
    ss = torch.linalg.vector_norm(block, dim=2, dtype=acc).square().sum(1, dtype=torch.float64)
    if not extrema:
        return ss, None, None
    hi, lo = block_extrema(block)
    return ss, _f64(hi), _f64(lo)


def formed_moments(terms: list[Dense | Rows], rows: int, cols: int, chunk_elements: int,
                   extrema: bool = True) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Sum of squares, max and min of G_i (B,) float64 each, forming G_i a block of rows at a time:
    at most ``chunk_elements`` entries (over the whole batch) are alive at once."""
    first = terms[0].right
    b, dev, dt = first.shape[0], first.device, first.dtype
    acc = acc_dtype(first)
    step = max(1, min(rows, chunk_elements // max(1, b * cols)))
    if step < rows and step >= 64:  # blocks start at multiples of 64 rows: aligned operands for a GPU's GEMM
        step -= step % 64
    ss = mx = mn = None  # the first block's, then each block's added (ss) or compared in turn
    rows_terms = [(t.index.reshape(-1), t.right.reshape(-1, cols),  # (B·T,) index, (B·T, C), example of each
                   torch.arange(b, device=dev)[:, None].expand(t.index.shape).reshape(-1))
                  for t in terms if isinstance(t, Rows)]
    for r0 in range(0, rows, step):
        r1 = min(rows, r0 + step)
        block = None  # (B, r1 - r0, C)
        for term in terms:
            if isinstance(term, Dense):
                part = torch.bmm(term.left[:, :, r0:r1].transpose(1, 2), term.right)
                block = part if block is None else block.add_(part)
        if rows_terms:
            if block is None:
                block = torch.zeros((b, r1 - r0, cols), dtype=dt, device=dev)
            flat = block.view(b * (r1 - r0), cols)
            for index, right, owner in rows_terms:  # fixed shapes, no host sync: a miss adds zeros to row 0
                hit = (index >= r0) & (index < r1)  # (B·T,)
                target = torch.where(hit, owner * (r1 - r0) + index - r0, 0)
                flat.index_add_(0, target, torch.where(hit[:, None], right, 0.0).to(dt))
        part, hi, lo = block_moments(block, acc, extrema)
        if ss is None:  # one block (most weights at a GPU's chunk_elements): no accumulators to fill
            ss, mx, mn = part, hi, lo
            continue
        ss = ss + part
        if extrema:
            mx = torch.maximum(mx, hi)
            mn = torch.minimum(mn, lo)
    if ss is None:  # no rows: nothing formed (as the accumulators started before)
        ss = torch.zeros(b, dtype=torch.float64, device=dev)
        mx = torch.full((b,), -torch.inf, dtype=torch.float64, device=dev)
        mn = torch.full((b,), torch.inf, dtype=torch.float64, device=dev)
    if not extrema:
        mx = mn = torch.full((b,), torch.nan, dtype=torch.float64, device=dev)
    return ss, mx, mn


def rows_moments(terms: list[Rows], rows: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Sum of squares, max and min of a sparse-row gradient (an embedding not tied to the head):
    G_i has a non-zero row only for each distinct index of example i, so aggregate those rows
    (O(T·C)) and count the untouched rows as zeros. (B,) float64 each.

    Fixed shapes throughout (no ``nonzero``/``unique``: nothing waits for the device): each example's
    indices are sorted, runs of one index are its distinct rows, and their sums land in a (B, T, C)
    buffer of which the first ``distinct`` slots are used."""
    index = torch.cat([t.index for t in terms], dim=1)  # (B, T')
    right = torch.cat([t.right for t in terms], dim=1)  # (B, T', C)
    b, t, c = right.shape
    acc = acc_dtype(right)
    key = torch.where(index >= 0, index, rows)  # no contribution: one sentinel run at the end
    ordered, order = key.sort(dim=1, stable=True)
    starts = torch.ones_like(ordered, dtype=torch.bool)
    starts[:, 1:] = ordered[:, 1:] != ordered[:, :-1]
    run = starts.cumsum(1) - 1  # (B, T'): the run (distinct index) of each sorted position
    real = ordered < rows  # (B, T'): sorted positions that count (a padding_idx row's δ does not)
    values = torch.where(real[..., None], right.gather(1, order[..., None].expand(b, t, c)), 0.0).to(acc)
    agg = torch.zeros((b, t, c), dtype=acc, device=right.device).scatter_add_(1, run[..., None].expand(b, t, c), values)
    used = torch.zeros((b, t), dtype=torch.bool, device=right.device).scatter_(1, run, real)  # runs of real rows
    ss = _f64(agg.square().sum(2)).sum(1)  # along a row in acc, across rows in float64
    mx = _f64(torch.where(used[..., None], agg, -torch.inf).amax((1, 2)))
    mn = _f64(torch.where(used[..., None], agg, torch.inf).amin((1, 2)))
    untouched = used.sum(1) < rows  # some rows of G_i are all zeros
    zero = torch.zeros_like(mx)
    return ss, torch.where(untouched, torch.maximum(mx, zero), mx), torch.where(untouched, torch.minimum(mn, zero), mn)


def matrix_moments(terms: list[Dense | Rows], rows: int, cols: int, *, extrema: bool = True,
                   chunk_elements: int = 1 << 26, fused: bool = False) -> Moments:
    """Moments of Σ_terms G_i for a (rows × cols) parameter; picks the cheapest exact method:
    sparse rows for an embedding alone, the ghost norm when no extrema are asked and it is cheaper,
    ``gradients.fused``'s kernel (``fused``: one dense term, and at most one of rows, in a dtype it takes
    where it runs), else formed blocks."""
    dense = [t for t in terms if isinstance(t, Dense)]
    sparse = [t for t in terms if isinstance(t, Rows)]
    if fused and extrema and len(dense) == 1 and len(sparse) <= 1 and fused_usable(terms):
        from grads_ray.gradients import fused as kernel

        return Moments(rows * cols, *kernel.block_moments(dense[0].left, dense[0].right,
                                                          *((sparse[0].index, sparse[0].right) if sparse else ())))
    s = entry_sum(terms)
    if all(isinstance(t, Rows) for t in terms):
        ss, mx, mn = rows_moments(terms, rows)
        if not extrema:
            mx = mn = torch.full_like(ss, torch.nan)
    elif not extrema and all(isinstance(t, Dense) for t in terms) and ghost_cheaper(
            sum(t.left.shape[1] for t in terms), rows, cols):
        ss = ghost_sumsq(terms)
        mx = mn = torch.full_like(ss, torch.nan)
    else:
        ss, mx, mn = formed_moments(terms, rows, cols, chunk_elements, extrema)
    return Moments(rows * cols, s, ss, mx, mn)


def project_terms(terms: list[Dense | Rows], p_rows: torch.Tensor, p_cols: torch.Tensor,
                  split: tuple[torch.Tensor, torch.Tensor] | None = None) -> torch.Tensor:
    """Kronecker-projected gradient P_r G_i P_cᵀ without G_i (LoGra): Σ_t (P_r l_t)(P_c r_t)ᵀ.
    p_rows (k_r, R), p_cols (k_c, C) -> (B, k_r * k_c) in ``acc`` dtype. ``split``: P_rᵀ (R, 2k_r) and
    P_cᵀ (C, 2k_c) as :func:`split_half` in the factors' half dtype, used where :func:`half_out`."""
    out = None
    for term in terms:
        acc = acc_dtype(term.right)
        half = split is not None and half_out(term.right) and term.right.dtype == split[1].dtype
        right = half_matmul(term.right, split[1]) if half else term.right.to(acc) @ p_cols.to(acc).T  # (B, T, k_c)
        if isinstance(term, Dense):
            left = half_matmul(term.left, split[0]) if half else term.left.to(acc) @ p_rows.to(acc).T  # (B, T, k_r)
        else:
            cols = p_rows.to(acc).T  # (R, k_r): row j is P_r e_j
            left = torch.where((term.index >= 0)[..., None], cols[term.index.clamp(min=0)], 0.0)
        part = torch.bmm(left.transpose(1, 2), right).flatten(1)
        out = part if out is None else out + part
    return out
