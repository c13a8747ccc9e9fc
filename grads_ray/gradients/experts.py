"""Mixture-of-experts layers: exact per-example gradients of transformers' 3-D expert weights.

transformers 5 keeps a layer's experts as 3-D parameters (``gate_up_proj`` or ``up_proj`` (E, R, C),
``down_proj``, optional ``*_bias`` (E, out)) in modules decorated with ``@use_experts_implementation``,
called as ``experts(hidden (N, d), top_k_index (N, k), top_k_weights (N, k))`` on flattened tokens,
N = B·T. Each of the N·k (token, slot) pairs goes through its expert e:

    y = act_gate(x W_up[e]ᵀ + b_up[e]) W_down[e]ᵀ + b_down[e],    out[token] += weight · y

(``is_transposed`` modules store W (E, in, out) and compute x W). During the engine's pass the module's
forward is this function, one ``F.linear`` per expert over its routed pairs (what the eager
implementation does), with every projection's input and output gradient kept with the token it
belongs to. Example i's gradient of W_up[e] is then Σ over its tokens routed to e of δ xᵀ, and
zero for an expert none of its tokens reached. :func:`check_equivalent` confirms, when the engine is
built, that this function computes what the module's own forward computes (any experts
implementation, any ``_apply_gate``).
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

from grads_ray.gradients.factored import Dense


def _weights(module: nn.Module) -> tuple[str, str | None, str, str | None]:
    """(up weight attr, up bias attr, down weight attr, down bias attr) of an experts module."""
    up = "gate_up_proj" if module.has_gate else "up_proj"
    return up, (up + "_bias") if module.has_bias else None, "down_proj", "down_proj_bias" if module.has_bias else None


def _project(x: torch.Tensor, w: torch.Tensor, b: torch.Tensor | None, transposed: bool) -> torch.Tensor:
    y = x @ w if transposed else nn.functional.linear(x, w)
    return y if b is None else y + b


def experts_forward(module: nn.Module, hidden: torch.Tensor, top_k_index: torch.Tensor, top_k_weights: torch.Tensor,
                    on_projection: Callable | None = None) -> torch.Tensor:
    """The experts module's output, one projection per expert over the pairs routed to it.
    hidden (N, d), top_k_index (N, k) long, top_k_weights (N, k) -> (N, d).

    ``on_projection(attr, bias_attr, expert, tokens, x, y) -> y`` sees each projection: its weight's
    attribute, the expert, the tokens (n,) of its rows, its input x (n, in) and output y (n, out)."""
    if getattr(module, "has_post_expert_norm", False):
        raise NotImplementedError("experts with a norm after each expert")
    n_tokens, k = top_k_index.shape
    num_experts = module.down_proj.shape[0]
    up, up_b, down, down_b = _weights(module)
    slot_expert = top_k_index.reshape(-1)  # (N·k,) token-major, as the module's own implementations
    slot_token = torch.arange(n_tokens, device=hidden.device).repeat_interleave(k)
    outs, where = [], []
    for e in torch.unique(slot_expert).tolist():
        if not 0 <= e < num_experts:  # expert-parallel sentinels: no expert here
            continue
        slots = (slot_expert == e).nonzero(as_tuple=True)[0]
        tokens = slot_token[slots]
        x = hidden[tokens]
        h = _project(x, getattr(module, up)[e], getattr(module, up_b)[e] if up_b else None, module.is_transposed)
        if on_projection is not None:
            h = on_projection(up, up_b, e, tokens, x, h)
        a = module._apply_gate(h) if module.has_gate else module.act_fn(h)
        y = _project(a, getattr(module, down)[e], getattr(module, down_b)[e] if down_b else None, module.is_transposed)
        if on_projection is not None:
            y = on_projection(down, down_b, e, tokens, a, y)
        outs.append(y)
        where.append(slots)
    if not outs:
        return torch.zeros_like(hidden)
    y = torch.cat(outs)
    out = y.new_zeros((n_tokens * k, y.shape[-1])).index_copy(0, torch.cat(where), y)
    out = out * top_k_weights.reshape(-1, 1)  # the routing weight's dtype wins (float32 routers)
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


def compact(tokens: torch.Tensor, values: torch.Tensor, b: int, t: int, keep: torch.Tensor) -> torch.Tensor:
    """Rows of one expert (tokens (n,) ascending, flat index b·T + t) -> (B, m, F): example i's rows
    first, zero rows after, m the most rows any example has; rows of padding tokens (``keep`` (B·T,)
    False) are zero. Sum over the m axis per example = sum over that example's routed tokens."""
    ex = torch.div(tokens, t, rounding_mode="floor")
    counts = torch.bincount(ex, minlength=b)
    m = int(counts.max().item()) if tokens.numel() else 0
    out = values.new_zeros((b, max(m, 1), values.shape[-1]))
    if tokens.numel():
        first = torch.cumsum(counts, 0) - counts  # where each example's rows start
        rank = torch.arange(tokens.numel(), device=tokens.device) - first[ex]
        out[ex, rank] = values * keep[tokens, None].to(values.dtype)
    return out


def expert_term(transposed: bool, delta: torch.Tensor, x: torch.Tensor) -> Dense:
    """The factors of G_i[e] = Σ δ xᵀ (weight stored (out, in)) or Σ x δᵀ (``is_transposed``: (in, out)),
    both (B, m, ·)."""
    return Dense(x, delta) if transposed else Dense(delta, x)
