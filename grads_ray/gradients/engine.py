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
  reduced when its last use has its δ;
- parameters of the same shape and rule are reduced together (``gradients.grouped``): every layer's
  q, every layer's k, …, each as one stack (N·B, P, ·) through the same few kernels, with the real-token
  mask applied once per stack and a norm's x̂ computed once per stack. The factors wait until
  ``hold_bytes`` of them are held (or backward ends), so the launches per batch grow with the number
  of distinct shapes, not of modules. Every per-example number lands in one moment table (params, 4, B);
  per-group statistics are reduced from it by index, and everything a batch returns reaches the host
  in one copy. Nothing in the pass waits for the device (no ``nonzero``, ``unique``, ``item``), except
  the MoE experts' routing and the replay rule.

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
from grads_ray.gradients import grouped
from grads_ray.gradients.factored import (
    Dense,
    Rows,
    Slice,
    acc_dtype,
    matrix_moments,
    project_terms,
    stacked_moments,
    vector_moments,
)
from grads_ray.gradients.features import fisher_from_gram, fisher_gram, fisher_projection, mean_over
from grads_ray.gradients.groups import GRAD_STATS, group_of
from grads_ray.gradients.layout import Layout, index_layout, token_layout
from grads_ray.gradients.projection import Projector
from grads_ray.gradients.rules import (
    LOOP_HINT,
    NormHat,
    UnsupportedModel,
    Use,
    elementwise_jacobian,
    first_tensor,
    norm_jacobian,
    plan,
)

__all__ = ["BatchScores", "BatchedGradStats", "UnsupportedModel", "elementwise_jacobian", "norm_jacobian"]

REPLAY_MAX = 1 << 20  # entries of a parameter the replay rule forms per example
HOLD_BYTES = {"cuda": 1 << 30, "cpu": 1 << 26}  # factors held for grouped reduction before a flush, by device


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
class _Held:
    """One use's factors as the pass left them (unmasked views), until its stack is reduced.

    ``dense``: left (B, P, R), right (B, P, C) of a matrix; ``bias``: left δ (B, P, n); ``norm``: left δ
    (B, P, d), right the norm's input as it came (its x̂ is computed for the stack), ``hat`` and
    ``layout`` to place it; ``vector``: ``value`` (B, n) formed already; ``term``: ``value`` a term of
    ``factored`` (masked), reduced on its own."""

    kind: str
    left: torch.Tensor | None = None
    right: torch.Tensor | None = None
    keep: torch.Tensor | None = None  # (B, P) bool, shared by every use with the same layout
    hat: NormHat | None = None
    layout: Layout | None = None
    value: Any = None

    def key(self) -> tuple:
        """Uses with equal keys are reduced as one stack."""
        if self.kind == "vector":
            return ("vector", tuple(self.value.shape), self.value.dtype)
        shapes = tuple(tuple(t.shape) for t in (self.left, self.right) if t is not None)
        dtypes = tuple(t.dtype for t in (self.left, self.right) if t is not None)
        return (self.kind, shapes, dtypes, id(self.keep), self.hat, self.layout)

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in (self.left, self.right, self.value)
                   if isinstance(t, torch.Tensor))


@dataclass
class _State:
    mask: torch.Tensor  # (B, T) bool, real tokens
    table: torch.Tensor  # (params, 4, B) float64: every parameter's per-example moments (zero: unused)
    sketch: torch.Tensor | None  # (B, proj_dim) float64, the projected gradient as stacks add to it
    pending: dict[str, int] = field(default_factory=lambda: defaultdict(int))
    terms: dict[str, list[_Held]] = field(default_factory=lambda: defaultdict(list))
    ready: list[tuple[str, _Held]] = field(default_factory=list)  # complete, waiting for their stack
    held: int = 0  # bytes in ``ready``
    keeps: dict[tuple, torch.Tensor] = field(default_factory=dict)
    hidden: torch.Tensor | None = None
    replaying: bool = False  # the engine's own module calls (replay rule): hooks stand aside
    modes: list[TorchFunctionMode] = field(default_factory=list)

    @property
    def b(self) -> int:
        return self.mask.shape[0]

    @property
    def t(self) -> int:
        return self.mask.shape[1]

    def keep(self, layout: Layout) -> torch.Tensor:
        """The real-token mask (B, P) of a layout, one tensor per layout for the whole pass."""
        key = (layout.kind, layout.positions)
        if key not in self.keeps:
            self.keeps[key] = layout.mask(self.mask)
        return self.keeps[key]


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
    ``keep_params`` adds every parameter's per-example moments to the output. ``hold_bytes`` bounds
    the factors held for grouped reduction (more: fewer, larger stacks; the peak grows by about that).
    By default 1 GiB on a GPU, where the pass is bound by launches, and 64 MiB elsewhere, where
    larger stacks only cost memory traffic (measured: 16 x 512 on the CPU, 1 GiB is 9% slower).
    """

    def __init__(self, model: nn.Module, *, proj_dim: int = 512, proj_rank: int = 8, seed: int = 0,
                 extrema: bool = True, chunk_elements: int = 1 << 26, fisher_dim: int = 64,
                 fisher_rank: int = 4, keep_params: bool = False, hold_bytes: int | None = None):
        self.model = model
        self.extrema, self.chunk_elements, self.keep_params = extrema, chunk_elements, keep_params
        device = next(model.parameters()).device.type
        self.hold_bytes = hold_bytes if hold_bytes is not None else HOLD_BYTES.get(device, HOLD_BYTES["cuda"])
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
        self.row = {n: i for i, n in enumerate(self.params)}  # the moment table's row of each parameter
        self.columns = ["n_tokens", "loss", "n_response_tokens", *GRAD_STATS,
                        *(f"{g}.{k}" for g in self.groups for k in GRAD_STATS)]
        self._member = torch.tensor([[self.group[n] == g for n in self.params] for g in self.groups])  # (G, P)
        self._numel = torch.tensor([float(p.numel()) for p in self.params.values()], dtype=torch.float64)
        self._stacks: dict[tuple, dict[str, torch.Tensor]] = {}  # per stack of names: its rows, blocks, buckets
        self._on_device: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}  # (member, numel) per device
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

    def __call__(self, input_ids: torch.Tensor, labels: torch.Tensor, attention_mask: torch.Tensor,
                 left_padded: bool | None = None) -> BatchScores:
        """input_ids, labels, attention_mask (B, T), left or right padded -> ``BatchScores``.
        ``left_padded`` False (the job's own right-padded batches) spares reading the mask on the host."""
        model = self.model
        mask = attention_mask.bool()
        b, dev = mask.shape[0], mask.device
        state = _State(mask=mask, table=torch.zeros((len(self.params), 4, b), dtype=torch.float64, device=dev),
                       sketch=torch.zeros((b, self.projector.dim), dtype=torch.float64, device=dev)
                       if self.projector else None)
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
            positions = left_padded_positions(mask) if left_padded is not False else None
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
                    self._complete(state, name)
                self._flush(state)
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
        """δ of a module's output: what each of its parameters needs is held (views, no arithmetic);
        the arithmetic is done per stack (``_flush``)."""
        args, kwargs, x, (lx, ly) = call
        with torch.no_grad():
            keep = state.keep(ly)  # (B, P)
            delta = ly.view(grad)  # (B, P, out)
            for e in use.entries:
                if e.rule == "replay":
                    held = _Held("vector" if getattr(use.module, e.attr).dim() == 1 else "term",
                                 value=self._replay(state, use, e.attr, args, kwargs, ly, grad))
                    if held.kind == "vector":
                        held.value = held.value.reshape(state.b, -1)
                elif e.attr.endswith("bias"):
                    held = _Held("bias", left=delta, keep=keep)
                elif e.rule in ("linear", "router"):
                    held = _Held("dense", left=delta, right=lx.view(x.detach()), keep=keep)
                elif e.rule == "conv1d":
                    held = _Held("dense", left=lx.view(x.detach()), right=delta, keep=keep)
                else:  # norm weight: Σ_p δ_p ⊙ ∂y_p/∂w
                    hat = use.jacobians[e.attr]
                    if isinstance(hat, NormHat):  # x̂ in closed form: for the whole stack at once
                        held = _Held("norm", left=delta, right=x.detach(), keep=keep, hat=hat, layout=lx)
                    else:  # forward-mode AD of this module
                        jac = torch.where(keep[..., None], lx.view(hat(use.module, e.attr, x.detach())), 0.0)
                        held = _Held("vector", value=(torch.where(keep[..., None], delta, 0.0) * jac).sum(1))
                self._add(state, e.name, held)

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
                self._add(state, e.name, _Held("term", value=Rows(index, torch.where(state.mask[..., None], delta, 0.0))))

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
                            self._add(state, names[a], _Held("term", value=Slice(expert, moe.expert_term(
                                module.is_transposed, *_common(delta, xs)))))
                        else:  # the expert's bias: (B, E, out) formed
                            full = getattr(module, a)
                            g = torch.zeros((state.b, *full.shape), dtype=delta.dtype, device=delta.device)
                            g[:, expert] = delta.sum(1)
                            self._add(state, names[a], _Held("term", value=g))
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

    def _add(self, state: _State, name: str, held: _Held) -> None:
        state.terms[name].append(held)
        state.pending[name] -= 1
        if state.pending[name] == 0:
            self._complete(state, name)

    def _complete(self, state: _State, name: str) -> None:
        """All uses of one parameter are in. A parameter with one use of a stackable kind waits for
        its stack; one used several times (a tied weight, a module called twice), an embedding, an
        expert, a replayed matrix, or one whose factors alone are a quarter of ``hold_bytes`` (an
        untied head's δ over the vocabulary: its kernels are large already) is reduced now, on its own."""
        held = state.terms.pop(name, [])
        state.pending[name] = 0
        if not held:  # no δ reached it: its per-example gradient is exactly zero (the table's default)
            return
        if len(held) == 1 and held[0].kind != "term" and held[0].nbytes() <= self.hold_bytes // 4:
            state.ready.append((name, held[0]))
            state.held += held[0].nbytes()
            if state.held > self.hold_bytes:
                self._flush(state)
            return
        self._reduce_alone(state, name, [self._materialize(h) for h in held])

    def _materialize(self, held: _Held):
        """One use as a term of ``factored``, padding zeroed (a formed (B, …) tensor for vectors)."""
        if held.kind in ("term", "vector"):
            return held.value
        if held.kind == "dense":
            keep = held.keep[..., None]
            return Dense(*_common(torch.where(keep, held.left, 0.0), torch.where(keep, held.right, 0.0)))
        return self._vectors(held.kind, [held])[0]

    def _vectors(self, kind: str, members: list[_Held]) -> torch.Tensor:
        """N uses of vector parameters of one kind and shape -> their per-example gradients (N, B, n)."""
        if kind == "vector":
            return torch.stack([h.value for h in members])
        first = members[0]
        delta = grouped.stacked([h.left for h in members], first.keep)  # (N, B, P, n)
        if kind == "bias":
            return delta.sum(2)
        x = torch.stack([h.right for h in members])  # norm: (N, *input), its x̂ once for the stack
        hat = first.hat(None, None, x).reshape(delta.shape)
        return (delta * grouped.zero_padding_(hat, first.keep)).sum(2)

    def _flush(self, state: _State) -> None:
        """Reduce every stack of the uses that are ready: one pass of kernels per distinct shape."""
        stacks: dict[tuple, list[tuple[str, _Held]]] = defaultdict(list)
        for name, held in state.ready:
            stacks[held.key()].append((name, held))
        state.ready, state.held = [], 0
        for key, members in stacks.items():
            names = tuple(n for n, _ in members)
            helds = [h for _, h in members]
            if key[0] == "dense":
                keep = helds[0].keep
                left, right = _common(grouped.stacked([h.left for h in helds], keep),
                                      grouped.stacked([h.right for h in helds], keep))
                self._store(state, names, grouped.dense_moments(left, right, extrema=self.extrema,
                                                                chunk_elements=self.chunk_elements))
                if self.projector:
                    blocks = self._stack(names, left.device, acc_dtype(left))
                    self._sketch(state, names, grouped.dense_project(left, right, blocks["p_rows"], blocks["p_cols"]))
            else:
                g = self._vectors(key[0], helds)
                self._store(state, names, grouped.vector_moments_stack(g, extrema=self.extrema))
                if self.projector:
                    self._sketch(state, names, grouped.vector_project(g, self._stack(names, g.device, acc_dtype(g))["p_vec"]))

    def _stack(self, names: tuple[str, ...], device, acc: torch.dtype | None = None) -> dict[str, torch.Tensor]:
        """A stack's table rows (``index``) and count-sketch ``bucket`` and ``sign`` of its columns, and
        with ``acc`` its projection blocks (``p_rows`` (N, k_r, R) and ``p_cols``, or ``p_vec`` (N, k, n));
        made once per stack."""
        key = (names, str(device), acc)
        if key not in self._stacks:
            out: dict[str, torch.Tensor] = {}
            if acc is None:
                out["index"] = torch.tensor([self.row[n] for n in names], device=device)
                if self.projector:
                    cols = torch.cat([torch.arange(self.projector.offsets[n].start, self.projector.offsets[n].stop)
                                      for n in names])
                    out["bucket"] = self.projector.bucket[cols].to(device)
                    out["sign"] = self.projector.sign[cols].to(device)
            else:
                parts = [self.projector.on(device, acc)[0][n] for n in names]
                for i, k in enumerate(("p_rows", "p_cols") if len(parts[0]) == 2 else ("p_vec",)):
                    out[k] = torch.stack([b[i] for b in parts])
            self._stacks[key] = out
        return self._stacks[key]

    def _store(self, state: _State, names: tuple[str, ...], moments: torch.Tensor) -> None:
        """moments (N, 4, B) float64 -> the table's rows of these parameters."""
        state.table.index_copy_(0, self._stack(names, state.table.device)["index"], moments)

    def _sketch(self, state: _State, names: tuple[str, ...], inner: torch.Tensor) -> None:
        """Stage-1 sketches (N, B, w) of these parameters -> added into the count sketch (B, dim)."""
        blocks = self._stack(names, state.sketch.device)
        flat = inner.transpose(0, 1).reshape(inner.shape[1], -1).to(torch.float64)  # (B, N·w), parameter-major
        state.sketch.index_add_(1, blocks["bucket"], flat * blocks["sign"])

    def _reduce_alone(self, state: _State, name: str, terms: list) -> None:
        """One parameter whose uses are not stackable: moments and sketch from its terms."""
        p = self.params[name]
        blocks = self.projector.on(p.device, torch.float64 if p.dtype == torch.float64 else torch.float32)[0] \
            if self.projector else None
        inner = None
        formed = [t for t in terms if isinstance(t, torch.Tensor)]
        if formed:  # vectors, biases, replayed parameters: (B, *shape) each
            if len(formed) != len(terms):
                raise UnsupportedModel(f"{name}: used both by a factored and a formed rule; {LOOP_HINT}")
            g = formed[0] if len(formed) == 1 else torch.stack(formed).sum(0)
            flat = g.reshape(g.shape[0], -1)
            m = vector_moments(flat, self.extrema)
            if blocks:
                block = blocks[name]
                acc = block[0].dtype
                if len(block) == 1:
                    inner = flat.to(acc) @ block[0].T
                else:
                    mat = g.reshape(g.shape[0], -1, g.shape[-1]).to(acc)
                    inner = torch.einsum("kr,brc,jc->bkj", block[0], mat, block[1]).flatten(1)
        elif isinstance(terms[0], Slice):
            slices, rows, cols = p.shape
            m = stacked_moments(terms, slices, rows, cols, extrema=self.extrema, chunk_elements=self.chunk_elements)
            if blocks:
                p_rows, p_cols = blocks[name]
                for t in terms:
                    part = project_terms([t.term], p_rows[:, t.index * rows:(t.index + 1) * rows], p_cols)
                    inner = part if inner is None else inner + part
        else:
            rows, cols = p.shape
            m = matrix_moments(terms, rows, cols, extrema=self.extrema, chunk_elements=self.chunk_elements)
            if blocks:
                inner = project_terms(terms, *blocks[name])
        self._store(state, (name,), grouped.table_rows(m.s, m.ss, m.mx, m.mn, 1))
        if inner is not None:
            self._sketch(state, (name,), inner[None])

    def _finish(self, state: _State, labels, loss: torch.Tensor, n_resp: torch.Tensor) -> BatchScores:
        """Per-group statistics from the moment table, the features, and one copy of it all to the host
        (the FisherSFT factors are then taken from their Gram matrices there)."""
        mask, table = state.mask, state.table
        dev = table.device
        if not self.extrema:
            table[:, 2:] = torch.nan
        if str(dev) not in self._on_device:
            self._on_device[str(dev)] = (self._member.to(dev), self._numel.to(dev))
        stats = grouped.group_statistics(table, *self._on_device[str(dev)])  # (1 + G, 5, B)
        head = torch.stack([mask.sum(1).to(torch.float64), torch.where(n_resp > 0, loss.double(), torch.nan),
                            n_resp.to(torch.float64)])  # (3, B)
        hidden = state.hidden.to(torch.float64 if state.hidden.dtype == torch.float64 else torch.float32)
        hidden = hidden.reshape(mask.shape[0], mask.shape[1], -1)
        pieces = {"columns": torch.cat([head, stats.flatten(0, 1)]),
                  "hidden_mean": mean_over(hidden, (labels != IGNORE_INDEX) & mask).float()}
        if self.projector:
            pieces["grad_proj"] = state.sketch.float()
        if self.fisher_rank:
            target = (labels[:, 1:] != IGNORE_INDEX) & mask[:, :-1] & mask[:, 1:]
            pieces["fisher_gram"] = fisher_gram(hidden[:, :-1], target, self.fisher_proj.to(hidden.device, hidden.dtype))
        if self.keep_params:
            pieces["params"] = table
        host = _to_host(pieces)  # one device-to-host copy
        out = BatchScores(dict(zip(self.columns, host["columns"], strict=True)), host["hidden_mean"],
                          grad_proj=host.get("grad_proj"))
        if self.fisher_rank:
            out.fisher_factor, out.fisher_energy = fisher_from_gram(host["fisher_gram"], self.fisher_rank)
        if self.keep_params:
            out.params = {n: {"s": v[0], "ss": v[1], "mx": v[2], "mn": v[3], "n": self.params[n].numel()}
                          for n, v in zip(self.params, host["params"], strict=True)}
        return out


def _to_host(pieces: dict[str, torch.Tensor]) -> dict[str, np.ndarray]:
    """Tensors on one device -> numpy arrays of the same shapes and dtypes, through one copy: each
    flattened into float64 (exact for float32, integers below 2^53) side by side."""
    flat = torch.cat([t.reshape(-1).to(torch.float64) for t in pieces.values()]).cpu().numpy()
    out, at = {}, 0
    for k, t in pieces.items():
        n = t.numel()
        out[k] = flat[at:at + n].reshape(tuple(t.shape)).astype(np.float32 if t.dtype == torch.float32 else np.float64)
        at += n
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
