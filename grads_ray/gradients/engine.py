"""Exact per-example loss, gradient statistics and features for a whole padded batch at once.

One forward and one backward of Σ_i L_i (L_i = example i's mean response-token loss; examples do not
interact, so the output gradient δ at example i's tokens is ∂L_i/∂output). During the pass:

- forward hooks keep each supported module's input a (B, T, in) (an embedding: its indices);
- a tensor hook on the module's output receives δ (B, T, out) during backward; the module's
  per-example gradient is then a sum of outer products over tokens (``factored``), reduced at once to
  moments (sum, sum of squares, max, min) and a Kronecker-projected sketch, then dropped;
- a parameter used twice (embedding tied to the LM head) is reduced when its last use has its δ.

Every parameter is frozen for the pass, so autograd computes no summed weight gradient at all: the
cost is the forward, the input-gradient half of the backward, and the per-example reductions, which
take the place of the weight-gradient half (≈ 6·params·tokens FLOPs in all, as for training).

Supported modules: ``nn.Linear`` (so peft LoRA adapters too), transformers' ``Conv1D`` (GPT-2),
``nn.Embedding`` (padding_idx honoured), and elementwise-affine norms (LayerNorm, RMSNorm variants:
their per-example gradient is Σ_t δ_t ⊙ ∂y_t/∂w, with ∂y/∂w by forward-mode AD of the module itself).
Any other trainable parameter is refused up front (``UnsupportedModel``): use ``scoring.engine=loop``.

Position ids come from the attention mask, so left padding leaves every example's numbers unchanged.
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from torch import nn

from grads_ray.data.formats import IGNORE_INDEX
from grads_ray.gradients.factored import Dense, Moments, Rows, matrix_moments, project_terms, vector_moments
from grads_ray.gradients.features import fisher_projection, fisher_summary, mean_over
from grads_ray.gradients.groups import group_of
from grads_ray.gradients.projection import Projector


class UnsupportedModel(ValueError):
    """A trainable parameter sits in a module the batched engine has no exact rule for."""


def _conv1d_type():
    try:
        from transformers.pytorch_utils import Conv1D
    except ImportError:  # pragma: no cover - transformers is a dependency
        return ()
    return (Conv1D,)


def rule_of(module: nn.Module) -> str | None:
    """Which per-example gradient rule applies to a module's own parameters, or None."""
    if isinstance(module, nn.Linear):
        return "linear"
    if isinstance(module, _conv1d_type()):
        return "conv1d"
    if isinstance(module, nn.Embedding):
        return "embedding"
    own = list(module.parameters(recurse=False))
    if "norm" in type(module).__name__.lower() and own and all(p.dim() == 1 for p in own):
        return "elementwise"
    return None


@dataclass
class BatchScores:
    """Engine output for B examples. ``columns``: ``loss, n_tokens, n_response_tokens``, the overall
    ``grad_*`` and ``<group>.grad_*``, each (B,) float64. Features: ``hidden_mean`` (B, d) mean last
    hidden state over response tokens; ``grad_proj`` (B, k) projected gradient (None if off);
    ``fisher_factor`` (B, r, d') with FᵀF ≈ Σ_t z_t z_tᵀ over the positions that predict response
    tokens (z = projected last hidden state), ``fisher_energy`` (B,) the share of trace(Σ z zᵀ) kept."""

    columns: dict[str, np.ndarray]
    hidden_mean: np.ndarray
    grad_proj: np.ndarray | None = None
    fisher_factor: np.ndarray | None = None
    fisher_energy: np.ndarray | None = None

    def row(self, i: int) -> dict[str, float]:
        return {k: float(v[i]) for k, v in self.columns.items()}


@dataclass
class _Call:
    module: nn.Module
    rule: str
    params: list[tuple[str, str]]  # (attribute on the module, trainable parameter name)
    inputs: torch.Tensor


@dataclass
class _State:
    mask: torch.Tensor  # (B, T) bool, real tokens
    pending: dict[str, int] = field(default_factory=lambda: defaultdict(int))
    terms: dict[str, list[Any]] = field(default_factory=lambda: defaultdict(list))
    moments: dict[str, Moments] = field(default_factory=dict)
    inner: dict[str, torch.Tensor] = field(default_factory=dict)
    hidden: torch.Tensor | None = None


class BatchedGradStats:
    """The batched exact engine for one model; call it on padded batches.

    ``proj_dim`` 0 turns the projected feature off; ``extrema`` False skips max/min (then the ghost
    norm is used wherever it is cheaper); ``chunk_elements`` bounds the formed gradient blocks;
    ``fisher_dim``/``fisher_rank`` shape the FisherSFT summary (0 turns it off).
    """

    def __init__(self, model: nn.Module, *, proj_dim: int = 512, proj_rank: int = 8, seed: int = 0,
                 extrema: bool = True, chunk_elements: int = 1 << 26, fisher_dim: int = 64,
                 fisher_rank: int = 4):
        self.model = model
        self.extrema, self.chunk_elements = extrema, chunk_elements
        self.params = {n: p for n, p in model.named_parameters() if p.requires_grad}  # ties once
        names = {id(p): n for n, p in self.params.items()}
        self.calls: list[tuple[nn.Module, str, list[tuple[str, str]]]] = []
        self.jacobians: dict[tuple[int, str], Any] = {}  # (module, attr) -> ∂y/∂w
        covered, refused = set(), []
        for mname, module in model.named_modules():
            own = [(attr, names[id(p)]) for attr, p in module.named_parameters(recurse=False) if id(p) in names]
            if not own:
                continue
            rule = rule_of(module)
            if rule is None:
                refused += [f"{mname}.{attr} ({type(module).__name__})" for attr, _ in own]
                continue
            self.calls.append((module, rule, own))
            covered |= {n for _, n in own}
            if rule == "elementwise":
                for attr, _ in own:
                    if attr != "bias":
                        self.jacobians[id(module), attr] = norm_jacobian(module, attr)
        missing = [n for n in self.params if n not in covered]
        if refused or missing:
            raise UnsupportedModel("no batched per-example gradient rule for: " + ", ".join(refused + missing)
                                   + "; set scoring.engine=loop to score this model one example at a time")
        self.group = {n: group_of(n) for n in self.params}
        self.groups = list(dict.fromkeys(self.group.values()))
        self.projector = (Projector({n: tuple(p.shape) for n, p in self.params.items()}, proj_dim, proj_rank, seed)
                          if proj_dim else None)
        self.fisher_proj, self.fisher_rank = fisher_projection(
            model.get_input_embeddings().embedding_dim, fisher_dim, fisher_rank, seed)

    # -- the pass ---------------------------------------------------------------------------------

    def __call__(self, input_ids: torch.Tensor, labels: torch.Tensor, attention_mask: torch.Tensor) -> BatchScores:
        """input_ids, labels, attention_mask (B, T), left or right padded -> ``BatchScores``."""
        model = self.model
        mask = attention_mask.bool()
        state = _State(mask=mask)
        frozen = [(p, p.requires_grad) for p in model.parameters()]
        handles = []
        try:
            for p, _ in frozen:
                p.requires_grad_(False)
            for module, rule, own in self.calls:
                handles.append(module.register_forward_hook(self._forward_hook(state, module, rule, own)))
            emb = model.get_input_embeddings()
            handles.append(emb.register_forward_hook(_needs_grad))
            handles.append(model.get_output_embeddings().register_forward_hook(
                lambda _m, inputs, _o: setattr(state, "hidden", inputs[0].detach())))
            position_ids = (mask.long().cumsum(1) - 1).clamp(min=0)
            out = model(input_ids=input_ids, attention_mask=attention_mask.long(), position_ids=position_ids,
                        use_cache=False)
            logits = out.logits  # (B, T, V)
            target = (labels[:, 1:] != IGNORE_INDEX) & mask[:, :-1] & mask[:, 1:]  # (B, T-1)
            n_resp = target.sum(1)
            acc = logits if logits.dtype == torch.float64 else logits.float()
            ce = nn.functional.cross_entropy(acc[:, :-1].flatten(0, 1), labels[:, 1:].clamp(min=0).flatten(),
                                             reduction="none").view(target.shape)
            per_example = (ce * target).sum(1) / n_resp.clamp(min=1)  # (B,)
            del acc, logits, out
            per_example.sum().backward()
            with torch.no_grad():
                for name in [n for n, k in state.pending.items() if k > 0]:  # uses that got no δ
                    self._reduce(state, name)
                return self._finish(state, labels, per_example.detach(), n_resp)
        finally:
            for h in handles:
                h.remove()
            for p, flag in frozen:
                p.requires_grad_(flag)

    def _forward_hook(self, state: _State, module: nn.Module, rule: str, own: list[tuple[str, str]]):
        def hook(_module, inputs, output):
            if not torch.is_grad_enabled():  # our own re-entry (the norm Jacobian), not the pass
                return None
            if not isinstance(output, torch.Tensor):
                raise UnsupportedModel(f"{type(module).__name__} returned {type(output).__name__}, not a tensor")
            x = inputs[0]
            if tuple(x.shape[:2]) != tuple(state.mask.shape):
                raise UnsupportedModel(f"{type(module).__name__} saw input {tuple(x.shape)}, expected "
                                       f"(batch, tokens, ...) = {tuple(state.mask.shape)}")
            if not output.requires_grad:
                output = output.requires_grad_()  # a frozen embedding's output: where backward stops
            call = _Call(module, rule, own, x.detach())
            for _, name in own:
                state.pending[name] += 1
            output.register_hook(lambda grad: self._on_grad(state, call, grad))
            return output
        return hook

    def _on_grad(self, state: _State, call: _Call, grad: torch.Tensor) -> None:
        with torch.no_grad():
            m = state.mask[..., None]
            delta = torch.where(m, grad, 0.0)
            x = call.inputs
            for attr, name in call.params:
                if call.rule == "embedding":
                    index = torch.where(state.mask, x, -1)
                    if call.module.padding_idx is not None:  # that row never receives a gradient
                        index = torch.where(index == call.module.padding_idx, -1, index)
                    term = Rows(index, delta)
                elif attr == "bias":
                    term = delta.sum(1)  # (B, out)
                elif call.rule == "linear":
                    term = Dense(delta, torch.where(m, x, 0.0))
                elif call.rule == "conv1d":
                    term = Dense(torch.where(m, x, 0.0), delta)
                else:  # elementwise affine: Σ_t δ_t ⊙ ∂y_t/∂w
                    term = (delta * self.jacobians[id(call.module), attr](call.module, attr, x)).sum(1)  # (B, n)
                state.terms[name].append(term)
                state.pending[name] -= 1
                if state.pending[name] == 0:
                    self._reduce(state, name)

    def _reduce(self, state: _State, name: str) -> None:
        """All uses of one parameter are in: moments and sketch, then drop its factors."""
        terms = state.terms.pop(name, [])
        state.pending[name] = 0
        p = self.params[name]
        b = state.mask.shape[0]
        if not terms:  # no δ reached it: its per-example gradient is exactly zero
            z = torch.zeros(b, dtype=torch.float64, device=p.device)
            state.moments[name] = Moments(p.numel(), z, z, z, z)
            if self.projector:
                width = self.projector.offsets[name].stop - self.projector.offsets[name].start
                state.inner[name] = torch.zeros((b, width), dtype=torch.float64, device=p.device)
            return
        blocks = self.projector.on(p.device, torch.float64 if p.dtype == torch.float64 else torch.float32)[0] \
            if self.projector else None
        if p.dim() == 1:
            g = terms[0] if len(terms) == 1 else torch.stack(terms).sum(0)
            state.moments[name] = vector_moments(g, self.extrema)
            if blocks:
                state.inner[name] = g.to(blocks[name][0].dtype) @ blocks[name][0].T
        else:
            rows, cols = p.shape
            state.moments[name] = matrix_moments(terms, rows, cols, extrema=self.extrema,
                                                 chunk_elements=self.chunk_elements)
            if blocks:
                state.inner[name] = project_terms(terms, *blocks[name])

    def _finish(self, state: _State, labels, loss: torch.Tensor, n_resp: torch.Tensor) -> BatchScores:
        mask = state.mask
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
        hidden_mean = mean_over(hidden, (labels != IGNORE_INDEX) & mask)
        out = BatchScores(cols, hidden_mean.float().cpu().numpy())
        if self.projector:
            inner = torch.cat([state.inner[n] for n in self.params], dim=1).to(torch.float64)
            out.grad_proj = self.projector.sketch(inner).float().cpu().numpy()
        if self.fisher_rank:
            target = (labels[:, 1:] != IGNORE_INDEX) & mask[:, :-1] & mask[:, 1:]
            out.fisher_factor, out.fisher_energy = fisher_summary(
                hidden[:, :-1], target, self.fisher_proj.to(hidden.device, hidden.dtype), self.fisher_rank)
        return out


def _needs_grad(_module, _inputs, output):
    return output if output.requires_grad else output.requires_grad_()


def _elementwise_jacobian(module: nn.Module, attr: str, x: torch.Tensor) -> torch.Tensor:
    """∂y/∂w_k for an elementwise parameter w of ``module`` (y_t[k] depends on w[k] alone): the
    forward-mode derivative along w = ones. x (B, T, d) -> (B, T, d)."""
    from torch.func import functional_call, jvp

    w = getattr(module, attr)
    _, tangent = jvp(lambda v: functional_call(module, {attr: v}, (x,)), (w.detach(),), (torch.ones_like(w),))
    return tangent


def _layer_norm_hat(module: nn.Module, x: torch.Tensor) -> torch.Tensor:
    return nn.functional.layer_norm(x, module.normalized_shape, None, None, module.eps)


def _rms_norm_hat(module: nn.Module, x: torch.Tensor, compute: torch.dtype | None) -> torch.Tensor:
    """x / rms(x), computed in ``compute`` (float32 as transformers' RMSNorms do; None: x's dtype)."""
    eps = getattr(module, "variance_epsilon", getattr(module, "eps", 1e-6))
    xf = x.to(compute) if compute is not None else x
    return (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)).to(x.dtype)


def norm_jacobian(module: nn.Module, attr: str):
    """The cheapest correct way to get ∂y/∂w for this module's elementwise weight: the normalised input
    x̂ in closed form (LayerNorm; RMSNorm, including the (1 + w) variants) when it agrees with
    forward-mode AD of the module on a random input, else forward-mode AD itself (a few times slower
    through torch.func). -> f(module, attr, x) -> (B, T, d)."""
    w = getattr(module, attr)
    candidates = []
    if isinstance(module, nn.LayerNorm) and attr == "weight":
        candidates.append(lambda m, a, x: _layer_norm_hat(m, x))
    elif attr == "weight" and "rms" in type(module).__name__.lower():
        candidates.append(lambda m, a, x: _rms_norm_hat(m, x, torch.float32))
        candidates.append(lambda m, a, x: _rms_norm_hat(m, x, None))
    gen = torch.Generator().manual_seed(0)
    probe = torch.randn((2, 3, w.shape[0]), generator=gen, dtype=torch.float64).to(w.device, w.dtype)
    with torch.no_grad():
        want = _elementwise_jacobian(module, attr, probe).double()
        tol = {torch.float64: 1e-12, torch.float32: 1e-6}.get(w.dtype, 1e-2)  # the same arithmetic, up to rounding
        for fn in candidates:
            got = fn(module, attr, probe).double()
            if got.shape == want.shape and torch.allclose(got, want, rtol=tol, atol=tol):
                return fn
    return _elementwise_jacobian


