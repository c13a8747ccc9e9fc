"""Exact per-example loss, gradient statistics and features for a whole padded batch at once.

One forward and one backward of Σ_i L_i (L_i = example i's mean response-token loss; examples do not
interact, so the output gradient δ at example i's positions is ∂L_i/∂output). During the pass:

- every module a rule covers (``gradients.rules``) keeps what its rule needs from its call (a linear
  layer's input, an embedding's looked-up indices, a norm's input), on whatever layout it sees
  (``gradients.layout``: (B, T, ·), per-head, flattened tokens); embeddings, experts and the replay
  rule are caught by ``gradients.capture``, the rest by an output hook here;
- a tensor hook on the module's output receives δ during backward; the module's per-example gradient
  is then a sum of outer products over positions (``factored``), reduced at once to moments (sum,
  sum of squares, max, min) and a Kronecker-projected sketch, then dropped;
- a parameter used more than once (an embedding tied to the LM head, a module called twice) is
  reduced when its last use has its δ;
- parameters of the same shape and rule are reduced together (``gradients.reduce`` holds and
  reduces, with the kernels of ``gradients.grouped``): every layer's
  q, every layer's k, …, each as one stack (N·B, P, ·) through the same few kernels, with the real-token
  mask applied once per stack and a norm's x̂ computed once per stack. The factors wait until
  ``hold_bytes`` of them are held (or backward ends), so the launches per batch grow with the number
  of distinct shapes, not of modules. Every per-example number lands in one moment table (params, 4, B);
  per-group statistics are reduced from it by index, and everything a batch returns reaches the host
  in one copy. Nothing in the pass waits for the device (no ``nonzero``, ``unique``, ``item``), except
  in a mixture of experts: one read per experts call (its padded stack's size) and one per expert
  weight (its blocks' counts), whatever the number of experts (``gradients.experts``). The replay
  rule's products are batched (vmap over autograd's backward), not one example at a time.

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
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import nn

from grads_ray.data.batching import left_padded_positions
from grads_ray.data.formats import IGNORE_INDEX
from grads_ray.gradients import capture, grouped, memory
from grads_ray.gradients import experts as moe
from grads_ray.gradients.features import fisher_from_gram, fisher_gram, fisher_projection, mean_over
from grads_ray.gradients.groups import GRAD_STATS, group_of
from grads_ray.gradients.layout import Layout, token_layout
from grads_ray.gradients.profiling import part
from grads_ray.gradients.projection import Projector
from grads_ray.gradients.reduce import Held, PassState, Reducer, to_host
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


class BatchedGradStats:
    """The batched exact engine for one model; call it on padded batches.

    ``proj_dim`` 0 turns the projected feature off; ``extrema`` False skips max/min (then the ghost
    norm is used wherever it is cheaper); ``chunk_elements`` bounds the formed gradient blocks (``auto``:
    by the model's device, gradients/memory.py);
    ``fisher_dim``/``fisher_rank`` shape the FisherSFT summary (0 turns it off).
    ``keep_params`` adds every parameter's per-example moments to the output. ``hold_bytes`` bounds
    the factors held for grouped reduction (more: fewer, larger stacks; the peak grows by about that).
    ``fused_moments`` reduces the stacked matrices' per-example blocks in one Triton kernel that never
    writes them (``gradients.fused``: bf16/fp16/fp32 on a GPU; elsewhere the formed path).
    By default 1 GiB on a GPU, where the pass is bound by launches, and 64 MiB elsewhere, where
    larger stacks only cost memory traffic (measured: 16 x 512 on the CPU, 1 GiB is 9% slower).
    """

    def __init__(self, model: nn.Module, *, proj_dim: int = 512, proj_rank: int = 8, seed: int = 0,
                 extrema: bool = True, chunk_elements: int | str = "auto", fisher_dim: int = 64,
                 fisher_rank: int = 4, keep_params: bool = False, hold_bytes: int | None = None,
                 fused_moments: bool = False):
        self.model = model
        device = next(model.parameters()).device.type
        chunk_elements = memory.chunk_elements(chunk_elements, device)
        self.extrema, self.chunk_elements, self.keep_params = extrema, chunk_elements, keep_params
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
        self.columns = ["n_tokens", "loss", "n_response_tokens", *GRAD_STATS,
                        *(f"{g}.{k}" for g in self.groups for k in GRAD_STATS)]
        self._member = torch.tensor([[self.group[n] == g for n in self.params] for g in self.groups])  # (G, P)
        self._numel = torch.tensor([float(p.numel()) for p in self.params.values()], dtype=torch.float64)
        self._on_device: dict = {}  # per device: (member, numel); per (device, dtype): the Fisher projection
        self.projector = (Projector({n: tuple(p.shape) for n, p in self.params.items()}, proj_dim, proj_rank, seed)
                          if proj_dim else None)
        self.reducer = Reducer(self.params, self.projector, extrema=extrema, chunk_elements=chunk_elements,
                               hold_bytes=self.hold_bytes, fused=fused_moments)
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
        return self.scores(to_host(self.device_pass(input_ids, labels, attention_mask, left_padded)))

    def device_pass(self, input_ids: torch.Tensor, labels: torch.Tensor, attention_mask: torch.Tensor,
                    left_padded: bool | None = None) -> dict[str, torch.Tensor]:
        """The pass's work on the device, nothing read back: everything a batch returns, as tensors on
        the batch's device (:meth:`scores` makes them ``BatchScores`` once on the host). With
        ``left_padded=False`` and no mixture of experts nothing in it waits for the device, so a CUDA
        graph can capture it (``benchmarks/grad_stats.py --sections graphs``)."""
        model = self.model
        mask = attention_mask.bool()
        b, dev = mask.shape[0], mask.device
        state = PassState(mask=mask, table=torch.zeros((len(self.params), 4, b), dtype=torch.float64, device=dev),
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
            with part("forward"):
                out = model(**kwargs)
                logits = out.logits  # (B, T, V)
                target = (labels[:, 1:] != IGNORE_INDEX) & mask[:, :-1] & mask[:, 1:]  # (B, T-1)
                n_resp = target.sum(1)
                acc = logits[:, :-1]  # sliced before the cast: backward writes its (B, T, V) gradient in
                acc = acc if acc.dtype == torch.float64 else acc.float()  # the logits' dtype, not float32
                ce = nn.functional.cross_entropy(acc.flatten(0, 1), labels[:, 1:].clamp(min=0).flatten(),
                                                 reduction="none").view(target.shape)
                per_example = (ce * target).sum(1) / n_resp.clamp(min=1)  # (B,)
                del acc, logits, out
            if per_example.requires_grad:
                with part("backward"):  # the model's own backward, with the hooks' parts inside it
                    per_example.sum().backward()
            with torch.no_grad():
                with part("last_flush"):
                    for name in [n for n, k in state.pending.items() if k > 0]:  # uses that got no δ
                        self.reducer.complete(state, name)
                    self.reducer.flush(state)
                    if self.projector:
                        self.reducer.finish_sketch(state)
                with part("finish"):
                    return self._pieces(state, labels, per_example.detach(), n_resp)
        finally:
            while state.modes:
                state.modes.pop().__exit__(None, None, None)
            for h in handles:
                h.remove()
            for module in swapped:
                del module.forward
            for p, flag in frozen:
                p.requires_grad_(flag)

    def _attach(self, state: PassState, use: Use, swapped: list[nn.Module]) -> list:
        rules = use.rules()
        module = use.module
        if "experts" in rules:
            module.forward = capture.experts_forward(self.reducer, state, use)
            swapped.append(module)
            return []
        if "embedding" in rules:
            return capture.lookup_hooks(self.reducer, state, use)
        return [module.register_forward_hook(self._output_hook(state, use), with_kwargs=True)]

    # linear, conv1d, norm, router and replay: δ at the module's (first) output ----------------------

    def _output_hook(self, state: PassState, use: Use):
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

    def _layouts(self, state: PassState, use: Use, x, y) -> tuple[Layout | None, Layout]:
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

    def _on_output_grad(self, state: PassState, use: Use, call, grad: torch.Tensor) -> None:
        """δ of a module's output: what each of its parameters needs is held (views, no arithmetic);
        the arithmetic is done per stack (``_flush``)."""
        args, kwargs, x, (lx, ly) = call
        with torch.no_grad():
            keep = state.keep(ly)  # (B, P)
            delta = ly.view(grad)  # (B, P, out)
            replayed = [e.attr for e in use.entries if e.rule == "replay"]  # one replay for all of them
            replayed = capture.replay(state, use, replayed, args, kwargs, ly, grad, self.chunk_elements) \
                if replayed else {}
            for e in use.entries:
                if e.rule == "replay":
                    g = replayed[e.attr]  # (B, *shape)
                    held = Held("vector", value=g.reshape(state.b, -1)) if g.dim() == 2 else Held("term", value=g)
                elif e.attr.endswith("bias"):
                    held = Held("bias", left=delta, keep=keep)
                elif e.rule in ("linear", "router"):
                    held = Held("dense", left=delta, right=lx.view(x.detach()), keep=keep)
                elif e.rule == "conv1d":
                    held = Held("dense", left=lx.view(x.detach()), right=delta, keep=keep)
                else:  # norm weight: Σ_p δ_p ⊙ ∂y_p/∂w
                    hat = use.jacobians[e.attr]
                    if isinstance(hat, NormHat):  # x̂ in closed form: for the whole stack at once
                        held = Held("norm", left=delta, right=x.detach(), keep=keep, hat=hat, layout=lx)
                    else:  # forward-mode AD of this module
                        jac = torch.where(keep[..., None], lx.view(hat(use.module, e.attr, x.detach())), 0.0)
                        held = Held("vector", value=(torch.where(keep[..., None], delta, 0.0) * jac).sum(1))
                self.reducer.add(state, e.name, held)

    # -- reduction --------------------------------------------------------------------------------

    def _pieces(self, state: PassState, labels, loss: torch.Tensor, n_resp: torch.Tensor) -> dict[str, torch.Tensor]:
        """Per-group statistics from the moment table and the features, on the device: what one copy
        takes to the host (``reduce.to_host``)."""
        mask, table = state.mask, state.table
        dev = table.device
        if not self.extrema:
            table[:, 2:] = torch.nan
        if str(dev) not in self._on_device:  # moved once: no host-to-device copy inside a pass
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
            key = (str(hidden.device), hidden.dtype)
            if key not in self._on_device:
                self._on_device[key] = self.fisher_proj.to(hidden.device, hidden.dtype)
            pieces["fisher_gram"] = fisher_gram(hidden[:, :-1], target, self._on_device[key])
        if self.keep_params:
            pieces["params"] = table
        return pieces

    def scores(self, host: dict[str, np.ndarray]) -> BatchScores:
        """A pass's pieces, on the host (``reduce.to_host`` of :meth:`device_pass`) -> ``BatchScores``;
        the FisherSFT factors are taken from their Gram matrices here."""
        out = BatchScores(dict(zip(self.columns, host["columns"], strict=True)), host["hidden_mean"],
                          grad_proj=host.get("grad_proj"))
        if self.fisher_rank:
            out.fisher_factor, out.fisher_energy = fisher_from_gram(host["fisher_gram"], self.fisher_rank)
        if self.keep_params:
            out.params = {n: {"s": v[0], "ss": v[1], "mx": v[2], "mn": v[3], "n": self.params[n].numel()}
                          for n, v in zip(self.params, host["params"], strict=True)}
        return out
