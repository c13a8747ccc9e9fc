"""Mixture-of-experts layers: exact per-example gradients of transformers' 3-D expert weights.

transformers 5 keeps a layer's experts as 3-D parameters (``gate_up_proj`` or ``up_proj`` (E, R, C),
``down_proj``, optional ``*_bias`` (E, out)) in modules decorated with ``@use_experts_implementation``,
called as ``experts(hidden (N, d), top_k_index (N, k), top_k_weights (N, k))`` on flattened tokens,
N = B·T. Each of the N·k (token, slot) pairs goes through its expert e:

    y = act_gate(x W_up[e]ᵀ + b_up[e]) W_down[e]ᵀ + b_down[e],    out[token] += weight · y

(``is_transposed`` modules store W (E, in, out) and compute x W). During the engine's pass the module's
forward is :func:`experts_forward`: the pairs sorted by expert, each projection one kernel over all
experts (a grouped matmul on a GPU; elsewhere batched matmuls over padded stacks: :func:`stack_levels`),
with every projection's input and output gradient kept with its pair. Example i's gradient of W_up[e] is then
Σ over its pairs routed to e of δ xᵀ, and zero for an expert none of its tokens reached: the
reduction (gradients/reduce.py) lays a weight's pairs out in (expert, example) blocks, a few padded
stacks of them (:func:`block_layout`, :func:`stack_pairs`), and reduces all its experts at once, as it
does every layer's q projection. Each costs one read of counts by the host per layer (the stacks' sizes), where
the per-expert loop read one per expert. :func:`check_equivalent` confirms, when the engine is built,
that this function computes what the module's own forward computes (any experts implementation, any
``_apply_gate``).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn


def _weights(module: nn.Module) -> tuple[str, str | None, str, str | None]:
    """(up weight attr, up bias attr, down weight attr, down bias attr) of an experts module."""
    up = "gate_up_proj" if module.has_gate else "up_proj"
    return up, (up + "_bias") if module.has_bias else None, "down_proj", "down_proj_bias" if module.has_bias else None


def _project(x: torch.Tensor, w: torch.Tensor, b: torch.Tensor | None, transposed: bool) -> torch.Tensor:
    """Every expert's projection at once: x (E, m, in), w (E, out, in) (or (E, in, out) when
    ``transposed``), b (E, out) -> (E, m, out)."""
    y = torch.bmm(x, w if transposed else w.transpose(1, 2))
    return y if b is None else y + b[:, None, :]


@dataclass(frozen=True)
class Level:
    """One padded stack of :func:`stack_levels`: ranks ``[start, start + height)`` of each of its
    ``experts`` (host array, ascending; None: every expert, the weight as it is), at rows
    ``[offset, offset + len(experts) * height)`` of the flattened stacks."""

    start: int
    height: int
    experts: np.ndarray | None
    offset: int
    size: int  # experts in the level


def stack_levels(counts: np.ndarray, row_cost: int, expert_cost: int, max_levels: int = 3,
                 gain: float = 0.8) -> list[Level]:
    """How the padded path stacks an experts call's pairs: one (E, cap, ·) stack (cap the most pairs
    an expert gets) unless routing is uneven enough that cutting it saves: level 0 holds every
    expert's first b0 pairs (the weights as they are), level 1 pairs b0..b1 of the experts that have
    more than b0 (their weights gathered), level 2 the rest up to cap (b0 = 0: no level 0, when most
    experts get no pair). The bounds minimise padded rows
    x ``row_cost`` (elements a row holds through both projections) + gathered experts x
    ``expert_cost`` (elements of one expert's weights); a cut plan is taken only below ``gain`` x the
    one stack's cost (each level is a few more kernels). counts (E,) int -> levels. All tokens to the
    same k of E experts: one stack holds E/k times the pairs, cut it holds the pairs; Zipf-like counts
    (e-th expert cap/e, E = 256): 42x against 2.8x (tests/test_grouped.py)."""
    counts = np.asarray(counts, np.int64)
    n_experts, cap = len(counts), max(int(counts.max(initial=0)), 1)
    if not counts.any():  # no pair routed here (expert-parallel sentinels, no tokens): one row an expert
        return [Level(0, 1, None, 0, n_experts)]
    ordered = np.sort(counts)
    cand = np.unique(ordered[ordered < cap])  # bounds worth trying: the counts (0: no level of all experts)

    def above(b):  # experts with more than b pairs
        return n_experts - np.searchsorted(ordered, b, side="right")

    best, plan = n_experts * cap * row_cost, [cap]
    if max_levels >= 2 and len(cand):
        h0 = above(cand)
        cost = (n_experts * cand + h0 * (cap - cand)) * row_cost + h0 * expert_cost
        j = int(np.argmin(cost))
        if cost[j] < gain * best:
            best, plan = float(cost[j]), [int(cand[j]), cap]
    if max_levels >= 3 and len(cand) > 1:
        b0, b1 = cand[:, None], cand[None, :]
        h0, h1 = above(b0), above(b1)
        cost = ((n_experts * b0 + h0 * (b1 - b0) + h1 * (cap - b1)) * row_cost + (h0 + h1) * expert_cost)
        cost = np.where(b1 > b0, cost, np.inf)
        i, j = np.unravel_index(int(np.argmin(cost)), cost.shape)
        if cost[i, j] < min(best, gain * n_experts * cap * row_cost):
            plan = [int(cand[i]), int(cand[j]), cap]
    levels, start, offset = [], 0, 0
    for j, bound in enumerate(plan):
        ids = None if j == 0 else np.flatnonzero(counts > start)
        size = n_experts if ids is None else len(ids)
        if bound > start and size:  # (bound 0: experts with no pair are most, no level of every expert)
            levels.append(Level(start, bound - start, ids, offset, size))
        offset += size * (bound - start)
        start = bound
    return levels


def stacked_rows(levels: list[Level]) -> int:
    """Rows of the levels' stacks flattened end to end."""
    return levels[-1].offset + levels[-1].size * levels[-1].height


def level_slots(levels: list[Level], expert: torch.Tensor, rank: torch.Tensor, ok: torch.Tensor,
                n_experts: int) -> torch.Tensor:
    """Each pair's row in the flattened stacks of ``levels``: expert (S,), rank (S,) its place among
    its expert's pairs, ok (S,) -> (S,) long; a sentinel (not ok) gets the spare row past the last.
    The levels' tables reach the device in one copy; nothing is read back."""
    n = len(levels)
    local = np.zeros((n, n_experts), np.int64)  # an expert's place in each level
    for j, lv in enumerate(levels):
        if lv.experts is None:
            local[j] = np.arange(n_experts)
        else:
            local[j, lv.experts] = np.arange(lv.size)
    table = np.array([[lv.offset, lv.height, lv.start] for lv in levels], np.int64)  # (L, 3)
    packed = to_device(np.concatenate([local.ravel(), table.ravel()]), expert.device)
    local, table = packed[:n * n_experts].view(n, n_experts), packed[n * n_experts:].view(n, 3)
    level = torch.bucketize(rank, table[1:, 2].contiguous(), right=True)  # (S,): the level of each pair's rank
    offset, height, start = table[level].unbind(1)
    slot = offset + local[level, expert] * height + rank - start
    return torch.where(ok, slot, stacked_rows(levels))


def to_device(a: np.ndarray, device: torch.device) -> torch.Tensor:
    """A small host array on ``device`` without waiting for the device's queue (pinned, asynchronous)."""
    t = torch.from_numpy(a)
    return t.pin_memory().to(device, non_blocking=True) if device.type == "cuda" else t.to(device)


def take_rows(t: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """t[index] along dim 0, with a deterministic backward on each device: on the CPU
    ``index_select`` (its backward adds rows in order; advanced indexing's accumulating ``index_put``
    gave run-to-run differences of ~1e-7 with two threads), on a GPU advanced indexing (its backward
    sorts the indices; ``index_select``'s adds with atomics)."""
    return t.index_select(0, index) if t.device.type == "cpu" else t[index]


@dataclass(frozen=True)
class Pairs:
    """The routed (token, expert) pairs of one experts call, sorted by expert (stable: by token within
    one): ``expert`` (S,) (clamped into range), ``tokens`` (S,) flat b·T + t, ``row`` (S,) the pair's row
    of a projection's input and output flattened (0 for a sentinel), ``ok`` (S,) False for an
    expert-parallel sentinel (no expert here)."""

    expert: torch.Tensor
    tokens: torch.Tensor
    row: torch.Tensor
    ok: torch.Tensor


def count_values(values: torch.Tensor, n: int) -> torch.Tensor:
    """How often each of 0..n-1 occurs in ``values`` (long, all in range) -> (n,) long. A fixed-shape
    scatter, where ``torch.bincount`` on a GPU reads the largest value on the host first."""
    return torch.zeros(n, dtype=torch.long, device=values.device).index_add_(0, values, torch.ones_like(values))


def grouped_matmul_fits(hidden: torch.Tensor, module: nn.Module) -> bool:
    """Whether :func:`experts_forward` takes ``torch.nn.functional.grouped_mm`` (one kernel over the
    pairs sorted by expert, no padding): bfloat16 on a Hopper or Blackwell GPU (compute capability 9
    or 10, where torch has its fused kernel; elsewhere it reads the offsets on the host and loops over
    groups), with 16-byte rows. Otherwise (the CPU's grouped_mm is slower than a padded bmm; no
    float64) the padded stack."""
    w = module.down_proj
    dims = (hidden.shape[-1], *w.shape[1:], *getattr(module, _weights(module)[0]).shape[1:])
    return (hidden.is_cuda and hasattr(nn.functional, "grouped_mm") and w.dtype == hidden.dtype == torch.bfloat16
            and torch.cuda.get_device_capability(hidden.device)[0] in (9, 10)
            and all(n * w.element_size() % 16 == 0 for n in dims))


def experts_forward(module: nn.Module, hidden: torch.Tensor, top_k_index: torch.Tensor, top_k_weights: torch.Tensor,
                    on_projection: Callable | None = None, grouped: bool | None = None) -> torch.Tensor:
    """The experts module's output, each projection one kernel over every expert's pairs: a grouped
    matmul over the pairs sorted by expert (``grouped``; default :func:`grouped_matmul_fits`), else a
    few batched matmuls over padded per-expert stacks (:func:`stack_levels`; the counts read by the host, once).
    hidden (N, d), top_k_index (N, k) long, top_k_weights (N, k) -> (N, d).

    ``on_projection(attr, bias_attr, pairs, x, y) -> y`` sees each projection: its weight's attribute,
    the :class:`Pairs`, its input x and output y ((S, ·) grouped, (rows, ·) the padded stacks flattened;
    a pair's row of them: ``row``)."""
    if getattr(module, "has_post_expert_norm", False):
        raise NotImplementedError("experts with a norm after each expert")
    n_tokens, k = top_k_index.shape
    num_experts = module.down_proj.shape[0]
    up, up_b, down, down_b = _weights(module)
    ids = top_k_index.reshape(-1)  # (N·k,) token-major, as the module's own implementations
    ok = (ids >= 0) & (ids < num_experts)
    expert, perm = torch.sort(torch.where(ok, ids, num_experts), stable=True)  # sentinels last
    ok = expert < num_experts
    counts = count_values(expert, num_experts + 1)[:num_experts]
    expert = expert.clamp(max=num_experts - 1)
    tokens = torch.div(perm, k, rounding_mode="floor")
    grouped = grouped_matmul_fits(hidden, module) if grouped is None else grouped
    if grouped:  # rows past the last offset (sentinels) are left unwritten by the kernel: masked
        offsets = torch.cumsum(counts, 0).to(torch.int32)
        pairs = Pairs(expert, tokens, torch.where(ok, torch.arange(expert.numel(), device=expert.device), 0), ok)
        x = torch.where(ok[:, None], take_rows(hidden, tokens), 0)

        def project(x, attr, bias_attr):
            w = getattr(module, attr)
            y = nn.functional.grouped_mm(x, w if module.is_transposed else w.transpose(1, 2), offs=offsets)
            y = torch.where(ok[:, None], y, 0)
            return y if bias_attr is None else y + getattr(module, bias_attr)[expert]
    else:
        rank = torch.arange(expert.numel(), device=expert.device) - (torch.cumsum(counts, 0) - counts)[expert]
        w_up, w_down = getattr(module, up), getattr(module, down)
        d = hidden.shape[-1]
        inter = w_down.shape[1] if module.is_transposed else w_down.shape[2]
        up_out = w_up.shape[2] if module.is_transposed else w_up.shape[1]
        levels = stack_levels(counts.cpu().numpy(),  # the one read by the host: the stacks' sizes
                              row_cost=2 * d + up_out + inter, expert_cost=(w_up[0].numel() + w_down[0].numel()))
        slot = level_slots(levels, expert, rank, ok, num_experts)
        pairs = Pairs(expert, tokens, torch.where(ok, slot, 0), ok)
        x = hidden.new_zeros((stacked_rows(levels) + 1, d)).index_copy(0, slot, take_rows(hidden, tokens))[:-1]  # (rows, d), flat
        gathered: dict[tuple[str, int], torch.Tensor] = {}

        def take(attr, j):  # a level's experts' rows of a weight (gathered once per call)
            t = getattr(module, attr)
            lv = levels[j]
            if lv.experts is None:
                return t
            if (attr, j) not in gathered:
                gathered[attr, j] = t.index_select(0, to_device(lv.experts, t.device))
            return gathered[attr, j]

        def project(x, attr, bias_attr):
            out = []
            for j, lv in enumerate(levels):
                seg = x[lv.offset:lv.offset + lv.size * lv.height].view(lv.size, lv.height, -1)
                y = _project(seg, take(attr, j), take(bias_attr, j) if bias_attr else None, module.is_transposed)
                out.append(y.reshape(lv.size * lv.height, -1))
            return out[0] if len(out) == 1 else torch.cat(out)
    h = project(x, up, up_b)
    if on_projection is not None:
        h = on_projection(up, up_b, pairs, x, h)
    a = module._apply_gate(h) if module.has_gate else module.act_fn(h)
    y = project(a, down, down_b)
    if on_projection is not None:
        y = on_projection(down, down_b, pairs, a, y)
    y = take_rows(y.reshape(-1, y.shape[-1]), pairs.row)  # (S, d): each pair's output
    weight = torch.where(ok, take_rows(top_k_weights.reshape(-1), perm), 0)
    y = y * weight[:, None]  # the routing weight's dtype wins (float32 routers)
    out = y.new_zeros((n_tokens * k, y.shape[-1])).index_copy(0, perm, y)  # back to (token, slot) order
    return out.view(n_tokens, k, -1).sum(1).to(hidden.dtype)


def check_equivalent(module: nn.Module) -> str | None:
    """None when :func:`experts_forward` matches the module's own forward on a random routing of a
    few tokens (in the module's dtype, to its rounding); else why not."""
    w = module.down_proj
    num_experts = w.shape[0]
    d = getattr(module, "hidden_dim", None) or (w.shape[2] if module.is_transposed else w.shape[1])
    k = min(2, num_experts)
    gen = torch.Generator().manual_seed(0)
    n = 7
    hidden = torch.randn((n, d), generator=gen, dtype=torch.float64).to(w.device, w.dtype)
    index = torch.stack([torch.randperm(num_experts, generator=gen)[:k] for _ in range(n)]).to(w.device)
    weights = torch.rand((n, k), generator=gen, dtype=torch.float64).to(w.device, w.dtype)
    try:
        with torch.no_grad():
            want = module(hidden, index, weights)
            got = experts_forward(module, hidden, index, weights)
    except Exception as exc:  # noqa: BLE001 - a module of another shape: not this rule's
        return f"{type(exc).__name__}: {exc}"
    tol = {torch.float64: 1e-10, torch.float32: 1e-5}.get(w.dtype, 3e-2)
    scale = want.double().abs().max().clamp(min=1e-30)
    err = ((got.double() - want.double()).abs().max() / scale).item()
    return None if err <= tol else f"its forward differs from the engine's experts rule by {err:.1e}"


@dataclass(frozen=True)
class Blocks:
    """A weight's pairs laid out by block, a block being one (expert, example): block id ``e·B + i``.

    ``order`` (S,): the pairs sorted by (bucket, block), left-out pairs last; ``block`` (S,) and
    ``rank`` (S,): each sorted pair's block and its place in it; ``local`` (E·B,): a block's place in
    its bucket; ``buckets``: per bucket its row count ``m`` (a power of two), its blocks' ids (host,
    ascending) and where its pairs and each of its blocks' pairs start in the sorted pairs (host)."""

    order: torch.Tensor
    block: torch.Tensor
    rank: torch.Tensor
    local: torch.Tensor
    buckets: list[tuple[int, np.ndarray, np.ndarray]]


def block_layout(expert: torch.Tensor, tokens: torch.Tensor, keep: torch.Tensor, b: int, t: int,
                 experts: int, max_buckets: int = 3) -> Blocks:
    """How a weight's pairs go into stacks (blocks, m, ·): each block padded to a power of two at or
    above its pair count, blocks of one size stacked together, at most ``max_buckets`` stacks (the
    sizes that cost the fewest padded rows are merged up: on a GPU each stack is a few launches), and
    no block for an (expert, example) with no pair. expert (S,), tokens (S,) flat b·T + t, keep (S,)
    bool (False: left out). One read by the host: the (E·B,) block counts."""
    n_blocks = experts * b
    seg = torch.where(keep, expert * b + torch.div(tokens, t, rounding_mode="floor"), n_blocks)
    counts = count_values(seg, n_blocks + 1)[:-1].cpu().numpy()
    size = np.zeros(n_blocks, np.int64)
    full = counts > 0
    size[full] = 1 << np.ceil(np.log2(counts[full])).astype(np.int64)
    sizes = _merged_sizes(size[full], max_buckets)
    size[full] = sizes[np.searchsorted(sizes, size[full])]  # each block in the smallest kept size that holds it
    bucket = np.full(n_blocks + 1, len(sizes), np.int64)  # left-out pairs' bucket: after every other
    bucket[:n_blocks][full] = np.searchsorted(sizes, size[full])
    local = np.zeros(n_blocks, np.int64)
    first = np.zeros(n_blocks + 1, np.int64)
    buckets, at = [], 0
    for j, m in enumerate(sizes.tolist()):
        ids = np.flatnonzero(bucket[:n_blocks] == j)
        local[ids] = np.arange(len(ids))
        starts = at + np.concatenate([[0], np.cumsum(counts[ids])])  # block k's pairs: [starts[k], starts[k + 1])
        first[ids] = starts[:-1]
        buckets.append((m, ids, starts))
        at = int(starts[-1])
    dev = expert.device
    key = torch.as_tensor(bucket, device=dev)[seg] * (n_blocks + 1) + seg
    order = torch.argsort(key, stable=True)
    block = seg[order]
    rank = torch.arange(seg.numel(), device=dev) - torch.as_tensor(first, device=dev)[block]
    return Blocks(order, block, rank, torch.as_tensor(local, device=dev), buckets)


def _merged_sizes(size: np.ndarray, max_buckets: int) -> np.ndarray:
    """Blocks' power-of-two sizes (n,) -> at most ``max_buckets`` sizes (ascending, the largest kept),
    merging each time the size whose blocks cost the fewest extra rows padded to the next size up."""
    sizes, count = np.unique(size, return_counts=True)
    sizes, count = sizes.tolist(), count.tolist()
    while len(sizes) > max_buckets:
        j = min(range(len(sizes) - 1), key=lambda i: count[i] * (sizes[i + 1] - sizes[i]))
        merged = count.pop(j)
        sizes.pop(j)
        count[j] += merged  # the next size up, now at j
    return np.asarray(sizes, np.int64)


def stack_pairs(values: torch.Tensor, slot: torch.Tensor, rows: int) -> torch.Tensor:
    """Pairs' rows values (S, F) into ``rows`` rows at ``slot`` (S,) (distinct), zero elsewhere -> (rows, F)."""
    return values.new_zeros((rows, values.shape[-1])).index_copy_(0, slot, values)
