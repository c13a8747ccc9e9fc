"""How the engine catches the uses that an output hook cannot: an embedding's lookups (inside the
module's call, whatever it does around them), a mixture of experts' projections (its forward run by
``gradients.experts``, each expert's tokens caught as they go), and the replay rule (a module called
again with one parameter live). Each hands what it caught to the pass's :class:`Reducer`.
"""

from __future__ import annotations

import inspect

import torch
from torch import nn
from torch.overrides import TorchFunctionMode

from grads_ray.determinism import explain
from grads_ray.gradients import experts as moe
from grads_ray.gradients import rules
from grads_ray.gradients.factored import Rows
from grads_ray.gradients.layout import Layout, index_layout
from grads_ray.gradients.memory import out_of_memory
from grads_ray.gradients.reduce import Held, PassState, Reducer
from grads_ray.gradients.rules import LOOP_HINT, UnsupportedModel, Use, first_tensor

# embeddings: the lookup, caught inside the module's call ------------------------------------------

def lookup_hooks(reducer: Reducer, state: PassState, use: Use) -> list:
    """An embedding module's forward pre- and post-hook handles: its weight's lookups go to the reducer."""
    module = use.module
    return [module.register_forward_pre_hook(_lookup_pre(reducer, state, use)),
            module.register_forward_hook(_lookup_post(state, use))]


def _lookup_pre(reducer: Reducer, state: PassState, use: Use):
    def hook(module, args):
        if state.replaying or not torch.is_grad_enabled():
            return None
        mode = Lookups(reducer, state, use)
        mode.__enter__()
        state.modes.append(mode)
        return None
    return hook


def _lookup_post(state: PassState, use: Use):
    def hook(module, args, output):
        if state.replaying or not torch.is_grad_enabled():
            return None
        mode = state.modes.pop() if state.modes else None
        if mode is not None:
            mode.__exit__(None, None, None)
            if not mode.seen:
                raise UnsupportedModel(f"{use.path} ({type(module).__name__}): the engine saw no lookup of "
                                       f"its weight; {LOOP_HINT}")
        return None
    return hook


def on_lookup(reducer: Reducer, state: PassState, use: Use, index: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
    """A lookup of the embedding's weight: index (B, T) or (B·T,) -> its rows; the rows made a leaf
    of the backward whose δ becomes the Rows term."""
    b, t = state.b, state.t
    index = index.reshape(b, t)
    keep = state.mask
    pad = getattr(use.module, "padding_idx", None)
    index = torch.where(keep, index, -1)
    if pad is not None:  # that row never receives a gradient
        index = torch.where(index == pad, -1, index)
    leaf = out.detach().requires_grad_()
    for e in use.entries:
        state.pending[e.name] += 1
    leaf.register_hook(lambda grad: _on_lookup_grad(reducer, state, use, index, grad))
    return leaf.clone()


def _on_lookup_grad(reducer: Reducer, state: PassState, use: Use, index: torch.Tensor, grad: torch.Tensor) -> None:
    with torch.no_grad():
        delta = grad.reshape(state.b, state.t, grad.shape[-1])
        for e in use.entries:
            reducer.add(state, e.name, Held("term", value=Rows(index, torch.where(state.mask[..., None], delta, 0.0))))


class Lookups(TorchFunctionMode):
    """Active only inside one embedding module's call: its weight's lookups (``F.embedding`` or an
    index into the weight) are handed to the engine, whatever the module does around them."""

    def __init__(self, reducer: Reducer, state: PassState, use: Use):
        super().__init__()
        self.reducer, self.state, self.use = reducer, state, use
        self.weight = use.module.weight
        self.seen = 0

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is nn.functional.embedding:
            weight = args[1] if len(args) > 1 else kwargs.get("weight")
            index = args[0] if args else kwargs.get("input")
            if weight is self.weight:
                if kwargs.get("scale_grad_by_freq") or kwargs.get("max_norm") is not None:
                    raise UnsupportedModel(f"{self.use.path}: scale_grad_by_freq / max_norm lookups; {LOOP_HINT}")
                return self._lookup(index, lambda idx: func(idx, weight, *args[2:], **{
                    k: v for k, v in kwargs.items() if k not in ("input", "weight")}))
        if func is torch.Tensor.__getitem__ and args and args[0] is self.weight and isinstance(args[1], torch.Tensor) \
                and not args[1].dtype.is_floating_point and args[1].dtype != torch.bool:
            return self._lookup(args[1], lambda idx: func(self.weight, idx))
        return func(*args, **kwargs)

    def _lookup(self, index: torch.Tensor, look):
        state = self.state
        kind = index_layout(tuple(index.shape), state.b, state.t)
        if kind is None:
            raise UnsupportedModel(f"{self.use.path} ({type(self.use.module).__name__}) looked up indices of shape "
                                   f"{tuple(index.shape)} in a batch of {state.b} x {state.t} tokens; {LOOP_HINT}")
        if kind == "shared":  # one row of positions for all: each example gets its own lookup
            index = index.expand(state.b, state.t)
        out = look(index)
        self.seen += 1
        return on_lookup(self.reducer, state, self.use, index, out)


# mixture of experts --------------------------------------------------------------------------------

def experts_forward(reducer: Reducer, state: PassState, use: Use):
    module = use.module
    names = {e.attr: e.name for e in use.entries}

    def on_projection(attr, bias_attr, pairs, x, y):
        if not y.requires_grad:
            return y
        live = [a for a in (attr, bias_attr) if a in names]
        for a in live:
            state.pending[names[a]] += 1
        rows = pairs.row
        x = x.detach()

        def grad_hook(grad):  # every expert's pairs at once, as (S, ·) rows
            with torch.no_grad():
                delta = grad.reshape(-1, grad.shape[-1])[rows]
                for a in live:
                    right = x.reshape(-1, x.shape[-1])[rows] if a == attr else None
                    reducer.add(state, names[a], Held("expert", left=delta, right=right,
                                                      value=(pairs, module.is_transposed)))
        y.register_hook(grad_hook)
        return y

    signature = inspect.signature(type(module).forward)

    def forward(*args, **kw):
        if state.replaying or not torch.is_grad_enabled():
            return type(module).forward(module, *args, **kw)
        bound = signature.bind(module, *args, **kw).arguments
        hidden, top_k_index, top_k_weights = list(bound.values())[1:4]
        if hidden.dim() != 2 or hidden.shape[0] != state.b * state.t:
            raise UnsupportedModel(f"{use.path} ({type(module).__name__}) saw input {tuple(hidden.shape)}, "
                                   f"not the {state.b * state.t} flattened tokens of the batch; {LOOP_HINT}")
        return moe.experts_forward(module, hidden, top_k_index, top_k_weights, on_projection)
    return forward


# the replay rule ------------------------------------------------------------------------------------

def replay(state: PassState, use: Use, attrs: list[str], args, kwargs, ly: Layout, grad: torch.Tensor,
           chunk_elements: int = 1 << 26) -> dict[str, torch.Tensor]:
    """Example i's gradient of parameters no other rule covers (``attrs`` of one module): the module
    called again on the same inputs (detached) with only those parameters live, and a vector-Jacobian
    product per example with δ kept at that example's positions, all at once (``is_grads_batched``:
    autograd's backward under vmap), in chunks of examples whose (c, B, P, out) cotangents stay within
    ``chunk_elements``. An op without a batching rule makes autograd loop itself; one that refuses
    vmap outright makes this loop over the examples (running out of memory is raised, as anywhere in the
    pass: the batch is too large). -> {attr: (B, *shape)}."""
    from torch.func import functional_call

    weights = {a: getattr(use.module, a) for a in attrs}
    for a, w in weights.items():
        if w.numel() > rules.REPLAY_MAX:
            raise UnsupportedModel(f"{use.path}.{a}: {w.numel():,} entries; {LOOP_HINT}")
    detach = lambda v: v.detach() if isinstance(v, torch.Tensor) else v  # noqa: E731
    args = tuple(detach(a) for a in args)
    kwargs = {k: detach(v) for k, v in kwargs.items()}
    m = ly.mask(state.mask)  # (B, P)
    delta = torch.where(m[..., None], ly.view(grad), 0.0)  # (B, P, out), in y's order
    b = state.b
    out = {a: torch.zeros((b, *w.shape), dtype=w.dtype, device=w.device) for a, w in weights.items()}
    state.replaying = True
    try:
        with torch.enable_grad():
            live = {a: w.detach().requires_grad_() for a, w in weights.items()}
            y = first_tensor(functional_call(use.module, live, args, kwargs))
            if y is None or not y.requires_grad:  # the parameters are unused: their gradients are zero
                return out
            c = max(1, min(b, chunk_elements // max(delta.numel(), 1)))
            for start in range(0, b, c):
                rows = torch.arange(start, min(start + c, b), device=delta.device)
                only = delta.new_zeros((len(rows), *delta.shape))
                only[torch.arange(len(rows), device=delta.device), rows] = delta[rows]  # row j: example start + j alone
                try:
                    got = torch.autograd.grad(y, list(live.values()), retain_graph=True, allow_unused=True,
                                              grad_outputs=only.reshape(len(rows), *y.shape).to(y.dtype),
                                              is_grads_batched=True)
                except RuntimeError as exc:  # an op that refuses vmap: one product per example
                    if out_of_memory(exc) or explain(exc):  # not that: said, not retried one by one
                        raise
                    got = _replay_each(y, list(live.values()), only)
                for a, g in zip(live, got, strict=True):
                    if g is not None:
                        out[a][rows] = g.to(out[a].dtype)
            real = m.any(1)  # examples with no real token: exactly zero
            return {a: torch.where(real.reshape(-1, *([1] * (g.dim() - 1))), g, 0.0) for a, g in out.items()}
    finally:
        state.replaying = False


def _replay_each(y: torch.Tensor, live: list[torch.Tensor], only: torch.Tensor) -> list[torch.Tensor]:
    """:func:`replay`'s products one example at a time: only (c, B, P, out) -> per parameter (c, *shape)."""
    got: list[list[torch.Tensor]] = [[] for _ in live]
    for row in only:
        grads = torch.autograd.grad(y, live, grad_outputs=row.reshape(y.shape).to(y.dtype), retain_graph=True,
                                    allow_unused=True)
        for acc, g, w in zip(got, grads, live, strict=True):
            acc.append(torch.zeros_like(w) if g is None else g)
    return [torch.stack(acc) for acc in got]
