"""Exact per-example loss, gradient statistics and features for a whole padded batch at once.

One forward and one backward of Σ_i L_i (L_i = example i's mean response-token loss; examples do not
interact, so the output gradient δ at example i's positions is ∂L_i/∂output). During the pass:

- every module a rule covers (``gradients.rules``) keeps what its rule needs from its call (a linear
  layer's input, an embedding's looked-up indices, a norm's input), on whatever layout it sees
  (``gradients.layout``: (B, T, ·), per-head, flattened tokens);
- a tensor hook on the module's output receives δ during backward; the module's per-example gradient
  is then a sum of outer products over positions (``factored``), reduced at once to moments (sum,
  sum of squares, max, min) and a Kronecker-projected sketch, then dropped;
- a parameter used more than once (an embedding tied to the LM head, a module called twice) is
  reduced when its last use has its δ.

Every parameter is frozen for the pass, so autograd computes no summed weight gradient at all: the
cost is the forward, the input-gradient half of the backward, and the per-example reductions, which
take the place of the weight-gradient half (≈ 6·params·tokens FLOPs in all, as for training).

A parameter no rule covers is refused up front (``UnsupportedModel``); a module that shows the engine
an input it cannot place (gathered rows, a mixed batch axis) is refused during the pass. Either way
nothing is written: ``score.engine=auto`` then scores one example at a time
(``gradients.selfcheck`` decides, on the model itself, before any corpus row).

Right-padded rows (as the job pads) run with the model's own positions, as each row alone does; a
left-padded batch gets position ids from the attention mask, so its numbers are unchanged too.
"""

from __future__ import annotations

import inspect
from collections import defaultdict
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.overrides import TorchFunctionMode

from grads_ray.data.batching import left_padded_positions
from grads_ray.data.formats import IGNORE_INDEX
from grads_ray.gradients import experts as moe
from grads_ray.gradients.factored import (
    Dense,
    Moments,
    Rows,
    Slice,
    matrix_moments,
    project_terms,
    stacked_moments,
    vector_moments,
)
from grads_ray.gradients.features import fisher_projection, fisher_summary, mean_over
from grads_ray.gradients.groups import group_of
from grads_ray.gradients.layout import Layout, index_layout, token_layout
from grads_ray.gradients.projection import Projector
from grads_ray.gradients.rules import (
    LOOP_HINT,
    UnsupportedModel,
    Use,
    elementwise_jacobian,
    first_tensor,
    norm_jacobian,
    plan,
)

__all__ = ["BatchScores", "BatchedGradStats", "UnsupportedModel", "elementwise_jacobian", "norm_jacobian"]

REPLAY_MAX = 1 << 20  # entries of a parameter the replay rule forms per example


@dataclass
class BatchScores:
    """Engine output for B examples. ``columns``: ``loss, n_tokens, n_response_tokens``, the overall
    ``grad_*`` and ``<group>.grad_*``, each (B,) float64. Features: ``hidden_mean`` (B, d) mean last
    hidden state over response tokens; ``grad_proj`` (B, k) projected gradient (None if off);
    ``fisher_factor`` (B, r, d') with FᵀF ≈ Σ_t z_t z_tᵀ over the positions that predict response
    tokens (z = projected last hidden state), ``fisher_energy`` (B,) the share of trace(Σ z zᵀ) kept.
    ``params``: per trainable parameter, its per-example ``s, ss, mx, mn`` (B,) float64 each, when
    the engine was asked to keep them (the self-check reads them)."""

    columns: dict[str, np.ndarray]
    hidden_mean: np.ndarray
    grad_proj: np.ndarray | None = None
    fisher_factor: np.ndarray | None = None
    fisher_energy: np.ndarray | None = None
    params: dict[str, dict[str, np.ndarray]] | None = None

    def row(self, i: int) -> dict[str, float]:
        return {k: float(v[i]) for k, v in self.columns.items()}


@dataclass
class _State:
    mask: torch.Tensor  # (B, T) bool, real tokens
    pending: dict[str, int] = field(default_factory=lambda: defaultdict(int))
    terms: dict[str, list[Any]] = field(default_factory=lambda: defaultdict(list))
    moments: dict[str, Moments] = field(default_factory=dict)
    inner: dict[str, torch.Tensor] = field(default_factory=dict)
    hidden: torch.Tensor | None = None
    replaying: bool = False  # the engine's own module calls (replay rule): hooks stand aside
    modes: list[TorchFunctionMode] = field(default_factory=list)

    @property
    def b(self) -> int:
        return self.mask.shape[0]

    @property
    def t(self) -> int:
        return self.mask.shape[1]


def _common(*xs: torch.Tensor) -> list[torch.Tensor]:
    dt = xs[0].dtype
    for x in xs[1:]:
        dt = torch.promote_types(dt, x.dtype)
    return [x.to(dt) for x in xs]


class BatchedGradStats:
    """The batched exact engine for one model; call it on padded batches.

    ``proj_dim`` 0 turns the projected feature off; ``extrema`` False skips max/min (then the ghost
    norm is used wherever it is cheaper); ``chunk_elements`` bounds the formed gradient blocks;
    ``fisher_dim``/``fisher_rank`` shape the FisherSFT summary (0 turns it off).
    ``keep_params`` adds every parameter's per-example moments to the output.
    """

    def __init__(self, model: nn.Module, *, proj_dim: int = 512, proj_rank: int = 8, seed: int = 0,
                 extrema: bool = True, chunk_elements: int = 1 << 26, fisher_dim: int = 64,
                 fisher_rank: int = 4, keep_params: bool = False):
        self.model = model
        self.extrema, self.chunk_elements, self.keep_params = extrema, chunk_elements, keep_params
        self.params = {n: p for n, p in model.named_parameters() if p.requires_grad}  # ties once
        self.uses: list[Use] = plan(model, self.params)
        bad = []
        for use in self.uses:
            if "experts" in use.rules():
                why = moe.check_equivalent(use.module)
                if why:
                    bad.append(f"{use.path} ({type(use.module).__name__}): {why}")
        if bad:
            raise UnsupportedModel("no batched per-example gradient rule for: " + "; ".join(bad) + "; " + LOOP_HINT)
        self.group = {n: group_of(n) for n in self.params}
        self.groups = list(dict.fromkeys(self.group.values()))
        self.projector = (Projector({n: tuple(p.shape) for n, p in self.params.items()}, proj_dim, proj_rank, seed)
                          if proj_dim else None)
        self.fisher_proj, self.fisher_rank = fisher_projection(
            model.get_input_embeddings().embedding_dim, fisher_dim, fisher_rank, seed)
        accepted = inspect.signature(model.forward).parameters
        self._takes = {k for k in ("position_ids", "use_cache") if k in accepted or any(
            p.kind == p.VAR_KEYWORD for p in accepted.values())}
        emb = model.get_input_embeddings()
        self._root_hook = not any(use.module is emb and "embedding" in use.rules() for use in self.uses)

    # -- the pass ---------------------------------------------------------------------------------

    def __call__(self, input_ids: torch.Tensor, labels: torch.Tensor, attention_mask: torch.Tensor) -> BatchScores:
        """input_ids, labels, attention_mask (B, T), left or right padded -> ``BatchScores``."""
        model = self.model
        mask = attention_mask.bool()
        state = _State(mask=mask)
        frozen = [(p, p.requires_grad) for p in model.parameters()]
        handles, swapped = [], []
        try:
            for p, _ in frozen:
                p.requires_grad_(False)
            for use in self.uses:
                handles += self._attach(state, use, swapped)
            if self._root_hook:  # a frozen input embedding: its output is where backward stops
                handles.append(model.get_input_embeddings().register_forward_hook(
                    lambda _m, _i, output: output.detach().requires_grad_().clone()))
            handles.append(model.get_output_embeddings().register_forward_hook(
                lambda _m, inputs, _o: setattr(state, "hidden", inputs[0].detach())))
            kwargs: dict[str, Any] = {"input_ids": input_ids, "attention_mask": attention_mask.long()}
            positions = left_padded_positions(mask)
            if positions is not None and "position_ids" in self._takes:
                kwargs["position_ids"] = positions
            if "use_cache" in self._takes:
                kwargs["use_cache"] = False
            out = model(**kwargs)
            logits = out.logits  # (B, T, V)
            target = (labels[:, 1:] != IGNORE_INDEX) & mask[:, :-1] & mask[:, 1:]  # (B, T-1)
            n_resp = target.sum(1)
            acc = logits if logits.dtype == torch.float64 else logits.float()
            ce = nn.functional.cross_entropy(acc[:, :-1].flatten(0, 1), labels[:, 1:].clamp(min=0).flatten(),
                                             reduction="none").view(target.shape)
            per_example = (ce * target).sum(1) / n_resp.clamp(min=1)  # (B,)
            del acc, logits, out
            if per_example.requires_grad:
                per_example.sum().backward()
            with torch.no_grad():
                for name in [n for n, k in state.pending.items() if k > 0]:  # uses that got no δ
                    self._reduce(state, name)
                return self._finish(state, labels, per_example.detach(), n_resp)
        finally:
            while state.modes:
                state.modes.pop().__exit__(None, None, None)
            for h in handles:
                h.remove()
            for module in swapped:
                del module.forward
            for p, flag in frozen:
                p.requires_grad_(flag)

    def _attach(self, state: _State, use: Use, swapped: list[nn.Module]) -> list:
        rules = use.rules()
        module = use.module
        if "experts" in rules:
            module.forward = self._experts_forward(state, use)
            swapped.append(module)
            return []
        if "embedding" in rules:
            return [module.register_forward_pre_hook(self._lookup_pre(state, use)),
                    module.register_forward_hook(self._lookup_post(state, use))]
        return [module.register_forward_hook(self._output_hook(state, use), with_kwargs=True)]

    # linear, conv1d, norm, router and replay: δ at the module's (first) output ----------------------

    def _output_hook(self, state: _State, use: Use):
        def hook(module, args, kwargs, output):
            if state.replaying or not torch.is_grad_enabled():
                return None
            y = first_tensor(output)
            if y is None:
                raise UnsupportedModel(f"{use.path} ({type(module).__name__}) returned {type(output).__name__}, "
                                       f"no tensor; {LOOP_HINT}")
            if not y.requires_grad:  # nothing upstream of it carries a gradient: its own is zero
                return None
            x = args[0] if args else first_tensor(kwargs)  # its input, passed by position or by name
            layouts = self._layouts(state, use, x, y)
            call = (args, kwargs, x, layouts)
            for e in use.entries:
                state.pending[e.name] += 1
            y.register_hook(lambda grad: self._on_output_grad(state, use, call, grad))
            return None
        return hook

    def _layouts(self, state: _State, use: Use, x, y) -> tuple[Layout | None, Layout]:
        b, t = state.b, state.t
        ly = token_layout(tuple(y.shape[:-1]), b, t)
        if ly is None:
            raise UnsupportedModel(f"{use.path} ({type(use.module).__name__}) output {tuple(y.shape)}: its "
                                   f"examples cannot be told apart in a batch of {b} x {t} tokens; {LOOP_HINT}")
        needs_x = use.rules() & {"linear", "conv1d", "norm", "router"}
        lx = None
        if needs_x:
            if not isinstance(x, torch.Tensor):
                raise UnsupportedModel(f"{use.path} ({type(use.module).__name__}) took no tensor input; {LOOP_HINT}")
            lx = token_layout(tuple(x.shape[:-1]), b, t)
            if lx is None or lx.positions != ly.positions:
                raise UnsupportedModel(f"{use.path} ({type(use.module).__name__}) saw input {tuple(x.shape)}: "
                                       f"its examples cannot be told apart in a batch of {b} x {t} tokens; {LOOP_HINT}")
            if ly.kind in ("flat", "flat1", "flat*") and ".experts." in f".{use.path}.":
                raise UnsupportedModel(f"{use.path}: an expert of a module list sees gathered rows; {LOOP_HINT}")
        return lx, ly

    def _on_output_grad(self, state: _State, use: Use, call, grad: torch.Tensor) -> None:
        args, kwargs, x, (lx, ly) = call
        with torch.no_grad():
            m = ly.mask(state.mask)  # (B, P)
            delta = torch.where(m[..., None], ly.view(grad), 0.0)  # (B, P, out)
            xv = torch.where(m[..., None], lx.view(x.detach()), 0.0) if lx is not None else None
            for e in use.entries:
                if e.rule == "replay":
                    term = self._replay(state, use, e.attr, args, kwargs, ly, grad)
                elif e.attr.endswith("bias"):
                    term = delta.sum(1)  # (B, out)
                elif e.rule in ("linear", "router"):
                    term = Dense(*_common(delta, xv))
                elif e.rule == "conv1d":
                    term = Dense(*_common(xv, delta))
                else:  # norm weight: Σ_p δ_p ⊙ ∂y_p/∂w
                    jac = use.jacobians[e.attr](use.module, e.attr, x.detach())
                    term = (delta * torch.where(m[..., None], lx.view(jac), 0.0)).sum(1)  # (B, d)
                self._add(state, e.name, term)

    def _replay(self, state: _State, use: Use, attr: str, args, kwargs, ly: Layout, grad: torch.Tensor) -> torch.Tensor:
        """Example i's gradient of a parameter no other rule covers: the module called again on the same
        inputs (detached) with only that parameter live, and one vector-Jacobian product per example
        with δ kept at that example's positions. -> (B, *shape)."""
        from torch.func import functional_call

        w = getattr(use.module, attr)
        if w.numel() > REPLAY_MAX:
            raise UnsupportedModel(f"{use.path}.{attr}: {w.numel():,} entries; {LOOP_HINT}")
        detach = lambda v: v.detach() if isinstance(v, torch.Tensor) else v  # noqa: E731
        args = tuple(detach(a) for a in args)
        kwargs = {k: detach(v) for k, v in kwargs.items()}
        m = ly.mask(state.mask)
        delta = torch.where(m[..., None], ly.view(grad), 0.0)
        out = torch.zeros((state.b, *w.shape), dtype=w.dtype, device=w.device)
        state.replaying = True
        try:
            with torch.enable_grad():
                live = w.detach().requires_grad_()
                y = first_tensor(functional_call(use.module, {attr: live}, args, kwargs))
                for i in range(state.b if y is not None and y.requires_grad else 0):  # else: unused, zero
                    if not m[i].any():
                        continue
                    only = torch.zeros_like(delta)
                    only[i] = delta[i]
                    (g,) = torch.autograd.grad(y, live, grad_outputs=only.reshape(y.shape).to(y.dtype),
                                               retain_graph=True, allow_unused=True)
                    if g is not None:
                        out[i] = g
        finally:
            state.replaying = False
        return out

    # embeddings: the lookup, caught inside the module's call ---------------------------------------

    def _lookup_pre(self, state: _State, use: Use):
        def hook(module, args):
            if state.replaying or not torch.is_grad_enabled():
                return None
            mode = _Lookups(self, state, use)
            mode.__enter__()
            state.modes.append(mode)
            return None
        return hook

    def _lookup_post(self, state: _State, use: Use):
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

    def _on_lookup(self, state: _State, use: Use, index: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
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
        leaf.register_hook(lambda grad: self._on_lookup_grad(state, use, index, grad))
        return leaf.clone()

    def _on_lookup_grad(self, state: _State, use: Use, index: torch.Tensor, grad: torch.Tensor) -> None:
        with torch.no_grad():
            delta = grad.reshape(state.b, state.t, grad.shape[-1])
            for e in use.entries:
                self._add(state, e.name, Rows(index, torch.where(state.mask[..., None], delta, 0.0)))

    # mixture of experts ------------------------------------------------------------------------------

    def _experts_forward(self, state: _State, use: Use):
        module = use.module
        names = {e.attr: e.name for e in use.entries}

        def on_projection(attr, bias_attr, expert, tokens, x, y):
            if not y.requires_grad:
                return y
            live = [a for a in (attr, bias_attr) if a in names]
            for a in live:
                state.pending[names[a]] += 1
            x = x.detach()

            def grad_hook(grad):
                with torch.no_grad():
                    keep = state.mask.reshape(-1)
                    delta = moe.compact(tokens, grad, state.b, state.t, keep)
                    for a in live:
                        if a == attr:
                            xs = moe.compact(tokens, x, state.b, state.t, keep)
                            self._add(state, names[a], Slice(expert, moe.expert_term(module.is_transposed,
                                                                                     *_common(delta, xs))))
                        else:  # the expert's bias: (B, E, out) formed
                            full = getattr(module, a)
                            g = torch.zeros((state.b, *full.shape), dtype=delta.dtype, device=delta.device)
                            g[:, expert] = delta.sum(1)
                            self._add(state, names[a], g)
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

    # -- reduction --------------------------------------------------------------------------------

    def _add(self, state: _State, name: str, term) -> None:
        state.terms[name].append(term)
        state.pending[name] -= 1
        if state.pending[name] == 0:
            self._reduce(state, name)

    def _reduce(self, state: _State, name: str) -> None:
        """All uses of one parameter are in: moments and sketch, then drop its factors."""
        terms = state.terms.pop(name, [])
        state.pending[name] = 0
        p = self.params[name]
        if not terms:  # no δ reached it: its per-example gradient is exactly zero
            self._zero(state, name)
            return
        blocks = self.projector.on(p.device, torch.float64 if p.dtype == torch.float64 else torch.float32)[0] \
            if self.projector else None
        formed = [t for t in terms if isinstance(t, torch.Tensor)]
        if formed:  # vectors, biases, replayed parameters: (B, *shape) each
            if len(formed) != len(terms):
                raise UnsupportedModel(f"{name}: used both by a factored and a formed rule; {LOOP_HINT}")
            g = formed[0] if len(formed) == 1 else torch.stack(formed).sum(0)
            flat = g.reshape(g.shape[0], -1)
            state.moments[name] = vector_moments(flat, self.extrema)
            if blocks:
                block = blocks[name]
                acc = block[0].dtype
                if len(block) == 1:
                    state.inner[name] = flat.to(acc) @ block[0].T
                else:
                    mat = g.reshape(g.shape[0], -1, g.shape[-1]).to(acc)
                    state.inner[name] = torch.einsum("kr,brc,jc->bkj", block[0], mat, block[1]).flatten(1)
            return
        if isinstance(terms[0], Slice):
            slices, rows, cols = p.shape
            state.moments[name] = stacked_moments(terms, slices, rows, cols, extrema=self.extrema,
                                                  chunk_elements=self.chunk_elements)
            if blocks:
                p_rows, p_cols = blocks[name]
                inner = None
                for t in terms:
                    part = project_terms([t.term], p_rows[:, t.index * rows:(t.index + 1) * rows], p_cols)
                    inner = part if inner is None else inner + part
                state.inner[name] = inner
            return
        rows, cols = p.shape
        state.moments[name] = matrix_moments(terms, rows, cols, extrema=self.extrema, chunk_elements=self.chunk_elements)
        if blocks:
            state.inner[name] = project_terms(terms, *blocks[name])

    def _zero(self, state: _State, name: str) -> None:
        p = self.params[name]
        z = torch.zeros(state.b, dtype=torch.float64, device=p.device)
        state.moments[name] = Moments(p.numel(), z, z, z if self.extrema else z + torch.nan,
                                      z if self.extrema else z + torch.nan)
        if self.projector:
            width = self.projector.offsets[name].stop - self.projector.offsets[name].start
            state.inner[name] = torch.zeros((state.b, width), dtype=torch.float64, device=p.device)

    def _finish(self, state: _State, labels, loss: torch.Tensor, n_resp: torch.Tensor) -> BatchScores:
        mask = state.mask
        for name in self.params:  # never used in this batch (a decoder's cross-attention, say)
            if name not in state.moments:
                self._zero(state, name)
        cols: dict[str, np.ndarray] = {
            "n_tokens": mask.sum(1).cpu().numpy().astype(np.float64),
            "loss": torch.where(n_resp > 0, loss.double(), torch.nan).cpu().numpy(),
            "n_response_tokens": n_resp.cpu().numpy().astype(np.float64),
        }
        per_group: dict[str, Moments] = {}
        for name in self.params:
            g = self.group[name]
            per_group[g] = state.moments[name] if g not in per_group else per_group[g].merge(state.moments[name])
        total = None
        for g in self.groups:
            total = per_group[g] if total is None else total.merge(per_group[g])
        for key, value in total.finish().items():
            cols[key] = value.cpu().numpy()
        for g in self.groups:
            for key, value in per_group[g].finish().items():
                cols[f"{g}.{key}"] = value.cpu().numpy()
        hidden = state.hidden.to(torch.float64 if state.hidden.dtype == torch.float64 else torch.float32)
        hidden = hidden.reshape(mask.shape[0], mask.shape[1], -1)
        hidden_mean = mean_over(hidden, (labels != IGNORE_INDEX) & mask)
        out = BatchScores(cols, hidden_mean.float().cpu().numpy())
        if self.projector:
            inner = torch.cat([state.inner[n].to(torch.float64) for n in self.params], dim=1)
            out.grad_proj = self.projector.sketch(inner).float().cpu().numpy()
        if self.fisher_rank:
            target = (labels[:, 1:] != IGNORE_INDEX) & mask[:, :-1] & mask[:, 1:]
            out.fisher_factor, out.fisher_energy = fisher_summary(
                hidden[:, :-1], target, self.fisher_proj.to(hidden.device, hidden.dtype), self.fisher_rank)
        if self.keep_params:
            out.params = {n: {"s": m.s.cpu().numpy(), "ss": m.ss.cpu().numpy(), "mx": m.mx.cpu().numpy(),
                              "mn": m.mn.cpu().numpy(), "n": m.n} for n, m in state.moments.items()}
        return out


class _Lookups(TorchFunctionMode):
    """Active only inside one embedding module's call: its weight's lookups (``F.embedding`` or an
    index into the weight) are handed to the engine, whatever the module does around them."""

    def __init__(self, engine: BatchedGradStats, state: _State, use: Use):
        super().__init__()
        self.engine, self.state, self.use = engine, state, use
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
        return self.engine._on_lookup(state, self.use, index, out)
