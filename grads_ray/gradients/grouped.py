"""Per-example gradient moments and sketches of N same-shaped parameters at once, and the per-group
statistics of a whole model from one table: pure functions on stacked tensors.

A model's layers repeat: every layer's q projection has the same shape, and so do its norms. Their
per-example gradients are reduced as one stack with a leading N axis, so a batch dispatches a few
kernels per distinct shape instead of per module (on a GPU the pass is bound by those launches).
Each function is the batched form of its one-parameter counterpart in ``factored``: stacking N
parameters of B examples is the same arithmetic as one parameter of N·B examples.

Shapes: N parameters, B examples, P positions per example, R × C a matrix parameter, n a vector's size.
"""

from __future__ import annotations

import torch

from grads_ray.gradients.factored import (
    Dense,
    half_matmul,
    half_out,
    matrix_moments,
    row_sums,
    vector_moments,
)

__all__ = ["dense_moments", "dense_project", "stacked", "zero_padding_", "table_rows", "unstacked_moments",
           "unstacked_project", "vector_moments_stack", "vector_project", "group_statistics"]


def zero_padding_(x: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
    """Zero the positions of padding in place: x (N, B, P, F), keep (B, P) bool -> x."""
    return x.masked_fill_(~keep[None, :, :, None], 0.0)


def stacked(parts: list[torch.Tensor], keep: torch.Tensor) -> torch.Tensor:
    """N tensors (B, P, F) -> one (N, B, P, F) with the positions of padding zeroed, each part read
    once and written once into its slot (a stack is the largest allocation of the reduction)."""
    out = torch.empty((len(parts), *parts[0].shape), dtype=parts[0].dtype, device=parts[0].device)
    k = keep[..., None]
    zero = _zero(out.dtype, out.device)
    for j, part in enumerate(parts):
        torch.where(k, part, zero, out=out[j])
    return out


_ZEROS: dict[tuple, torch.Tensor] = {}


def _zero(dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """A 0-dim zero on ``device``, made once (a fill kernel per stack on a GPU otherwise)."""
    key = (dtype, str(device))
    if key not in _ZEROS:
        _ZEROS[key] = torch.zeros((), dtype=dtype, device=device)
    return _ZEROS[key]


def table_rows(s: torch.Tensor, ss: torch.Tensor, mx: torch.Tensor, mn: torch.Tensor, n: int) -> torch.Tensor:
    """Moments over N·B rows (parameter-major) -> (N, 4, B) float64: entry sum, sum of squares, max, min
    (extrema of a narrower dtype are promoted by the stack, exactly)."""
    return torch.stack([s, ss, mx, mn]).view(4, n, -1).transpose(0, 1)


def dense_moments(left: torch.Tensor, right: torch.Tensor, *, extrema: bool, chunk_elements: int,
                  fused: bool = False) -> torch.Tensor:
    """G_{j,i} = Σ_p left[j,i,p] ⊗ right[j,i,p] for N matrices: left (N, B, P, R), right (N, B, P, C),
    padding zero in both -> (N, 4, B) float64 moments. ``fused`` (``score.fused_moments``): all four from
    ``gradients.fused``'s kernel, which never writes G, where it takes the factors."""
    n, b, p, r = left.shape
    m = matrix_moments([Dense(left.reshape(n * b, p, r), right.reshape(n * b, p, -1))], r, right.shape[-1],
                       extrema=extrema, chunk_elements=chunk_elements, fused=fused)
    return table_rows(m.s, m.ss, m.mx, m.mn, n)


def dense_project(left: torch.Tensor, right: torch.Tensor, p_rows: torch.Tensor, p_cols: torch.Tensor,
                  split: tuple[torch.Tensor, torch.Tensor] | None = None) -> torch.Tensor:
    """Kronecker sketches P_r G P_cᵀ of N matrices without forming G: left (N, B, P, R), right
    (N, B, P, C), p_rows (N, k_r, R), p_cols (N, k_c, C) in the accumulation dtype -> (N, B, k_r·k_c).
    ``split``: P_rᵀ (N, R, 2k_r) and P_cᵀ (N, C, 2k_c) as ``factored.split_half`` in the factors' half
    dtype; where ``factored.half_out`` allows, the factors are multiplied as they are (no float32 copy
    of every stacked factor) with float32 results."""
    n, b, p, r = left.shape
    c = right.shape[-1]
    acc = p_rows.dtype
    if split is not None and half_out(left):
        lp = half_matmul(left.reshape(n, b * p, r), split[0]).view(n * b, p, -1)
        rp = half_matmul(right.reshape(n, b * p, c), split[1]).view(n * b, p, -1)
    else:
        lp = torch.bmm(left.reshape(n, b * p, r).to(acc), p_rows.transpose(1, 2)).view(n * b, p, -1)
        rp = torch.bmm(right.reshape(n, b * p, c).to(acc), p_cols.transpose(1, 2)).view(n * b, p, -1)
    return torch.bmm(lp.transpose(1, 2), rp).view(n, b, -1)


def unstacked_moments(lefts: list[torch.Tensor], rights: list[torch.Tensor], keep: torch.Tensor) -> torch.Tensor:
    """N matrices' moments from their factors as the pass captured them, unstacked and unmasked: lefts
    N × (B, P, R), rights N × (B, P, C) in one dtype ``gradients.fused`` takes, keep (B, P) bool -> (N, 4, B) float64, as
    :func:`dense_moments` with ``fused`` (``gradients.fused``'s kernel reads the real positions of each
    member in place: no stacked copy of the factors, no masked copy)."""
    from grads_ray.gradients import fused

    n, (b, _, r), c = len(lefts), lefts[0].shape, rights[0].shape[-1]
    out = torch.empty((n, b, fused.tiles(r, c), 4), dtype=torch.float32, device=lefts[0].device)
    for j in range(n):
        fused.tile_moments(lefts[j], rights[j], keep=keep, out=out[j])
    return fused.reduce_tiles(out).transpose(1, 2)  # (N, 4, B), a view


def unstacked_project(lefts: list[torch.Tensor], rights: list[torch.Tensor], keep: torch.Tensor,
                      p_rows: torch.Tensor, p_cols: torch.Tensor,
                      split: tuple[torch.Tensor, torch.Tensor] | None = None) -> torch.Tensor:
    """:func:`dense_project` of unstacked, unmasked factors (lefts N × (B, P, R), rights N × (B, P, C),
    keep (B, P)): each member's factors times its sketch matrices, padding rows of the (B, P, k)
    products zeroed (the same as zeroing the factors' rows first) -> (N, B, k_r·k_c)."""
    acc, (b, p, _), n = p_rows.dtype, lefts[0].shape, len(lefts)
    half = split is not None and half_out(lefts[0])
    drop = ~keep[None, :, :, None]
    sides = []
    for xs, mats, cut in ((lefts, p_rows, 0), (rights, p_cols, 1)):
        width = split[cut].shape[-1] if half else mats.shape[1]
        got = torch.empty((n, b, p, width), dtype=acc, device=xs[0].device)  # each member's product in its slot
        for j, x in enumerate(xs):
            if half:  # the halves added for the whole stack at once
                half_matmul(x, split[cut][j], halves=True, out=got[j])
            else:
                torch.matmul(x.to(acc), mats[j].T, out=got[j])
        if half:
            got = got[..., :width // 2] + got[..., width // 2:]
        sides.append(got.masked_fill_(drop, 0.0).view(n * b, p, -1))  # both: padding may hold NaN
    return torch.bmm(sides[0].transpose(1, 2), sides[1]).view(n, b, -1)


def vector_moments_stack(g: torch.Tensor, *, extrema: bool) -> torch.Tensor:
    """N vector parameters' per-example gradients g (N, B, n), formed -> (N, 4, B) float64 moments."""
    n, b, k = g.shape
    if not extrema:
        m = vector_moments(g.reshape(n * b, k), extrema)
        return table_rows(m.s, m.ss, m.mx, m.mn, n)
    flat = g.reshape(n * b, k)
    # the extrema in g's dtype: exact in float64, where the stack promotes them (no cast of their own)
    return table_rows(*row_sums(flat), flat.amax(1), flat.amin(1), n)


def vector_project(g: torch.Tensor, p_vec: torch.Tensor) -> torch.Tensor:
    """Dense sketches of N vectors: g (N, B, n), p_vec (N, k, n) -> (N, B, k) in p_vec's dtype."""
    return torch.bmm(g.to(p_vec.dtype), p_vec.transpose(1, 2))


def group_statistics(table: torch.Tensor, member: torch.Tensor, numel: torch.Tensor) -> torch.Tensor:
    """The whole model's and each group's gradient statistics from every parameter's moments.

    table (P, 4, B) float64 (entry sum, sum of squares, max, min per parameter and example), member
    (G, P) bool (parameter p is in group g), numel (P,) float64 entries per parameter ->
    (1 + G, 5, B): the overall statistics first, then each group's, each ``grad_norm, grad_mean,
    grad_std`` (population), ``grad_max, grad_min``. Sums are matrix products and extrema masked
    reductions: deterministic, whatever the device."""
    s, ss, mx, mn = table.unbind(1)  # (P, B) each
    weight = member.to(table.dtype)
    counts = torch.cat([numel.sum()[None], weight @ numel])  # (1 + G,)
    sums = torch.cat([s.sum(0, keepdim=True), weight @ s])
    squares = torch.cat([ss.sum(0, keepdim=True), weight @ ss])
    top = torch.cat([mx.amax(0, keepdim=True), torch.where(member[:, :, None], mx[None], -torch.inf).amax(1)])
    low = torch.cat([mn.amin(0, keepdim=True), torch.where(member[:, :, None], mn[None], torch.inf).amin(1)])
    mean = sums / counts[:, None]
    var = (squares / counts[:, None] - mean * mean).clamp(min=0.0)
    return torch.stack([squares.sqrt(), mean, var.sqrt(), top, low], dim=1)
