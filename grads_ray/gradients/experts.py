"""Mixture-of-experts layers: exact per-example gradients of transformers' 3-D expert weights.

transformers 5 keeps a layer's experts as 3-D parameters (``gate_up_proj`` or ``up_proj`` (E, R, C),
``down_proj``, optional ``*_bias`` (E, out)) in modules decorated with ``@use_experts_implementation``,
called as ``experts(hidden (N, d), top_k_index (N, k), top_k_weights (N, k))`` on flattened tokens,
N = B·T. Each of the N·k (token, slot) pairs goes through its expert e:

    y = act_gate(x W_up[e]ᵀ + b_up[e]) W_down[e]ᵀ + b_down[e],    out[token] += weight · y

(``is_transposed`` modules store W (E, in, out) and compute x W). During the engine's pass the module's
forward is :func:`experts_forward`: the pairs sorted by expert, each projection one kernel over all
experts (a grouped matmul on a GPU; elsewhere a batched matmul over one padded stack (E, cap, ·), cap
the most pairs one expert gets), with every projection's input and output gradient kept with its pair. Example i's gradient of W_up[e] is then
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
    """Every expert's projection at once: x (E, cap, in), w (E, out, in) (or (E, in, out) when
    ``transposed``), b (E, out) -> (E, cap, out)."""
    y = torch.bmm(x, w if transposed else w.transpose(1, 2))
    return y if b is None else y + b[:, None, :]


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
    batched matmul over the padded per-expert stack (E, cap, ·) (cap read by the host, once).
    hidden (N, d), top_k_index (N, k) long, top_k_weights (N, k) -> (N, d).

    ``on_projection(attr, bias_attr, pairs, x, y) -> y`` sees each projection: its weight's attribute,
    the :class:`Pairs`, its input x and output y ((S, ·) grouped, (E, cap, ·) padded; a pair's row of
    them flattened: ``row``)."""
    if getattr(module, "has_post_expert_norm", False):
        raise NotImplementedError("experts with a norm after each expert")
    n_tokens, k = top_k_index.shape
    num_experts = module.down_proj.shape[0]
    up, up_b, down, down_b = _weights(module)
    ids = top_k_index.reshape(-1)  # (N·k,) token-major, as the module's own implementations
    ok = (ids >= 0) & (ids < num_experts)
    expert, perm = torch.sort(torch.where(ok, ids, num_experts), stable=True)  # sentinels last
    ok = expert < num_experts
    counts = torch.bincount(expert, minlength=num_experts + 1)[:num_experts]
    expert = expert.clamp(max=num_experts - 1)
    tokens = torch.div(perm, k, rounding_mode="floor")
    grouped = grouped_matmul_fits(hidden, module) if grouped is None else grouped
    if grouped:  # rows past the last offset (sentinels) are left unwritten by the kernel: masked
        offsets = torch.cumsum(counts, 0).to(torch.int32)
        pairs = Pairs(expert, tokens, torch.where(ok, torch.arange(expert.numel(), device=expert.device), 0), ok)
        x = torch.where(ok[:, None], hidden[tokens], 0)

        def project(x, attr, bias_attr):
            w = getattr(module, attr)
            y = nn.functional.grouped_mm(x, w if module.is_transposed else w.transpose(1, 2), offs=offsets)
            y = torch.where(ok[:, None], y, 0)
            return y if bias_attr is None else y + getattr(module, bias_attr)[expert]
    else:
        cap = max(int(counts.max().item()), 1)  # the one read by the host: the stack's size
        rank = torch.arange(expert.numel(), device=expert.device) - (torch.cumsum(counts, 0) - counts)[expert]
        slot = torch.where(ok, expert * cap + rank, num_experts * cap)  # sentinels: a spare row, dropped
        pairs = Pairs(expert, tokens, torch.where(ok, slot, 0), ok)
        rows = hidden.new_zeros((num_experts * cap + 1, hidden.shape[-1]))
        x = rows.index_copy(0, slot, hidden[tokens])[:-1].view(num_experts, cap, -1)

        def project(x, attr, bias_attr):
            return _project(x, getattr(module, attr), getattr(module, bias_attr) if bias_attr else None,
                            module.is_transposed)
    h = project(x, up, up_b)
    if on_projection is not None:
        h = on_projection(up, up_b, pairs, x, h)
    a = module._apply_gate(h) if module.has_gate else module.act_fn(h)
    y = project(a, down, down_b)
    if on_projection is not None:
        y = on_projection(down, down_b, pairs, a, y)
    y = y.reshape(-1, y.shape[-1])[pairs.row]  # (S, d): each pair's output
    weight = torch.where(ok, top_k_weights.reshape(-1)[perm], 0)
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
    counts = torch.bincount(seg, minlength=n_blocks + 1)[:-1].cpu().numpy()
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
