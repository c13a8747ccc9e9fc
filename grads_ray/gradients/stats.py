"""Per-example loss, gradient statistics and hidden-state features (pure torch, no Ray).

For example i with response-token mask m_i, the loss is the mean next-token cross-entropy over its
response tokens, L_i = (1/|m_i|) Σ_{t∈m_i} -log p(y_t | y_<t), and g_i = ∇θ L_i over all trainable
parameters θ. Reported, overall and per layer group G (P_G entries):
    grad_norm = ‖g‖₂,  grad_mean = Σg/P,  grad_std = sqrt(Σg²/P - mean²)  (population),
    grad_max = max g,  grad_min = min g.
Sums are accumulated in float64 whatever the model's dtype.

This is the simple exact engine: one forward+backward per example on its unpadded tokens, so padding
can never leak into the numbers; what research code for gradient-based selection does (LESS runs
batch size 1). ``engine.BatchedGradStats`` computes the same numbers for a whole batch at once.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch

from grads_ray.data.formats import IGNORE_INDEX
from grads_ray.gradients.engine import BatchScores
from grads_ray.gradients.features import fisher_projection, fisher_summary, mean_over
from grads_ray.gradients.groups import GRAD_STATS, group_of
from grads_ray.gradients.projection import Projector


@dataclass
class _Acc:
    """Running count, sum, sum of squares, max and min of gradient entries (float64)."""

    n: int = 0
    s: float = 0.0
    ss: float = 0.0
    mx: float = -math.inf
    mn: float = math.inf

    def add(self, g: torch.Tensor) -> None:
        g = g.detach().to(torch.float64)
        self.n += g.numel()
        self.s += g.sum().item()
        self.ss += (g * g).sum().item()
        self.mx = max(self.mx, g.max().item())
        self.mn = min(self.mn, g.min().item())

    def merge(self, other: _Acc) -> None:
        self.n += other.n
        self.s += other.s
        self.ss += other.ss
        self.mx = max(self.mx, other.mx)
        self.mn = min(self.mn, other.mn)

    def finish(self) -> dict[str, float]:
        mean = self.s / self.n
        var = max(self.ss / self.n - mean * mean, 0.0)
        return {"grad_norm": math.sqrt(self.ss), "grad_mean": mean, "grad_std": math.sqrt(var),
                "grad_max": self.mx, "grad_min": self.mn}


def response_loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Mean shifted cross-entropy over labelled tokens. logits (T, V), labels (T,) -> scalar."""
    shift_logits = logits[:-1]  # (T-1, V): position t predicts token t+1
    shift_labels = labels[1:]  # (T-1,)
    return torch.nn.functional.cross_entropy(
        shift_logits.float() if shift_logits.dtype != torch.float64 else shift_logits,
        shift_labels, ignore_index=IGNORE_INDEX, reduction="mean",
    )


def trainable(model: torch.nn.Module) -> list[tuple[str, torch.nn.Parameter]]:
    return [(n, p) for n, p in model.named_parameters() if p.requires_grad]


def forward_hidden(model: torch.nn.Module, input_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """One forward of (1, T) ids -> (logits (1, T, V), the LM head's input (1, T, d)): the hidden state
    the batched engine keeps too, whatever the model's ``hidden_states`` tuple holds."""
    seen: list[torch.Tensor] = []
    handle = model.get_output_embeddings().register_forward_hook(lambda _m, inputs, _o: seen.append(inputs[0]))
    try:
        # every token real, said as the batched pass says it (a model that reads padding off the token
        # ids when given no mask, as XLM does, would otherwise mask a real token that equals its pad id)
        extra = {"use_cache": False} if _takes(model, "use_cache") else {}
        logits = model(input_ids=input_ids, attention_mask=torch.ones_like(input_ids), **extra).logits
    finally:
        handle.remove()
    return logits, seen[-1].reshape(input_ids.shape[0], input_ids.shape[1], -1)


def _takes(model: torch.nn.Module, key: str) -> bool:
    import inspect

    accepted = inspect.signature(model.forward).parameters
    return key in accepted or any(p.kind == p.VAR_KEYWORD for p in accepted.values())


def example_stats(model: torch.nn.Module, input_ids: torch.Tensor, labels: torch.Tensor,
                  params: list[tuple[str, torch.nn.Parameter]] | None = None,
                  ) -> tuple[dict[str, float], torch.Tensor, dict[str, torch.Tensor]]:
    """One example (unpadded) -> (stats dict (overall and ``<group>.<stat>``), its last hidden states
    (T, d), its whole gradient per parameter name). input_ids, labels (T,)."""
    params = params if params is not None else trainable(model)
    logits, hidden = forward_hidden(model, input_ids[None])
    loss = response_loss(logits[0], labels)
    grads = torch.autograd.grad(loss, [p for _, p in params], allow_unused=True, materialize_grads=True)
    total, groups = _Acc(), {}
    for (name, _), g in zip(params, grads, strict=True):
        acc = groups.setdefault(group_of(name), _Acc())
        acc.add(g)
    for acc in groups.values():
        total.merge(acc)
    row = {"n_tokens": int(input_ids.shape[0]), "loss": loss.item(), **total.finish(),
           "n_response_tokens": int((labels[1:] != IGNORE_INDEX).sum().item())}
    for group, acc in groups.items():
        for stat, value in acc.finish().items():
            row[f"{group}.{stat}"] = value
    return row, hidden[0].detach(), {n: g for (n, _), g in zip(params, grads, strict=True)}


class LoopGradStats:
    """The per-example loop behind the same interface as ``engine.BatchedGradStats`` (same columns,
    same projection and features, same seeds): the benchmarks' baseline and ``scoring.engine=loop``
    for models the batched engine has no rule for. Projection forms each whole gradient (slow)."""

    def __init__(self, model: torch.nn.Module, *, proj_dim: int = 512, proj_rank: int = 8, seed: int = 0,
                 fisher_dim: int = 64, fisher_rank: int = 4, **_ignored):
        self.model = model
        self.params = trainable(model)
        self.projector = (Projector({n: tuple(p.shape) for n, p in self.params}, proj_dim, proj_rank, seed)
                          if proj_dim else None)
        self.fisher_proj, self.fisher_rank = fisher_projection(
            model.get_input_embeddings().embedding_dim, fisher_dim, fisher_rank, seed)

    def __call__(self, input_ids: torch.Tensor, labels: torch.Tensor, attention_mask: torch.Tensor,
                 left_padded: bool | None = None) -> BatchScores:
        """input_ids, labels, attention_mask (B, T), any padding -> ``BatchScores``. Padding positions
        are dropped before each example's own forward and backward (``left_padded`` is not needed)."""
        rows, hidden, proj, factors, energy = [], [], [], [], []
        for i in range(input_ids.shape[0]):
            keep = attention_mask[i].bool()  # (T,)
            ids, lab = input_ids[i][keep], labels[i][keep]
            row, h, grads = example_stats(self.model, ids, lab, self.params)
            rows.append(row)
            h = h.to(torch.float64 if h.dtype == torch.float64 else torch.float32)[None]  # (1, T, d)
            hidden.append(mean_over(h, (lab != IGNORE_INDEX)[None])[0].float().cpu().numpy())
            if self.projector:
                proj.append(self.projector.project_full({n: g.cpu() for n, g in grads.items()}).float().numpy())
            if self.fisher_rank:
                f, e = fisher_summary(h[:, :-1], (lab[1:] != IGNORE_INDEX)[None],
                                      self.fisher_proj.to(h.device, h.dtype), self.fisher_rank)
                factors.append(f[0])
                energy.append(e[0])
        keys = list(rows[0]) if rows else []
        out = BatchScores({k: np.array([r[k] for r in rows], dtype=np.float64) for k in keys},
                          np.stack(hidden) if hidden else np.zeros((0, 0), np.float32))
        if self.projector:
            out.grad_proj = np.stack(proj) if proj else np.zeros((0, self.projector.dim), np.float32)
        if self.fisher_rank and factors:
            out.fisher_factor, out.fisher_energy = np.stack(factors), np.array(energy)
        return out


__all__ = ["GRAD_STATS", "LoopGradStats", "example_stats", "forward_hidden", "response_loss", "trainable"]
