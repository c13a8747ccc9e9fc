"""Per-example loss, gradient statistics and hidden-state features (pure torch, no Ray).

For example i with response-token mask m_i, the loss is the mean next-token cross-entropy over its
response tokens, L_i = (1/|m_i|) Σ_{t∈m_i} -log p(y_t | y_<t), and g_i = ∇θ L_i over all trainable
parameters θ. Reported, overall and per layer group G (P_G entries):
    grad_norm = ‖g‖₂,  grad_mean = Σg/P,  grad_std = sqrt(Σg²/P - mean²)  (population),
    grad_max = max g,  grad_min = min g.
Sums are accumulated in float64 whatever the model's dtype.

This is the simple exact engine: one forward+backward per example on its unpadded tokens, so padding
can never leak into the numbers. The batched engine (issue 3) must match it.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch

from grads_ray.data.formats import IGNORE_INDEX
from grads_ray.gradients.groups import GRAD_STATS, group_of


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


def example_stats(model: torch.nn.Module, input_ids: torch.Tensor, labels: torch.Tensor,
                  params: list[tuple[str, torch.nn.Parameter]] | None = None,
                  ) -> tuple[dict[str, float], torch.Tensor]:
    """One example (unpadded): stats dict (overall and ``<group>.<stat>``) and the mean of its last
    hidden states over response positions (labels != -100), which describes the response's content
    rather than the prompt template. input_ids, labels (T,) -> ({column: value}, (d_model,))."""
    params = params if params is not None else trainable(model)
    out = model(input_ids=input_ids[None], output_hidden_states=True)
    logits = out.logits[0]  # (T, V)
    response = labels != IGNORE_INDEX  # (T,)
    hidden = out.hidden_states[-1][0][response].mean(dim=0)  # (d_model,)
    loss = response_loss(logits, labels)
    grads = torch.autograd.grad(loss, [p for _, p in params])
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
    return row, hidden.detach()


def batch_stats(model: torch.nn.Module, input_ids: torch.Tensor, labels: torch.Tensor,
                attention_mask: torch.Tensor) -> tuple[list[dict[str, float]], np.ndarray]:
    """A padded batch (left or right padding): per-example stats rows and features.

    input_ids, labels, attention_mask (B, T) -> ([B rows], (B, d_model) float32).
    Padding positions (attention_mask 0) are dropped before each example's pass.
    """
    params = trainable(model)
    rows, feats = [], []
    for i in range(input_ids.shape[0]):
        keep = attention_mask[i].bool()  # (T,)
        row, hidden = example_stats(model, input_ids[i][keep], labels[i][keep], params)
        rows.append(row)
        feats.append(hidden.float().cpu().numpy())
    return rows, np.stack(feats) if feats else np.zeros((0, 0), np.float32)


__all__ = ["GRAD_STATS", "batch_stats", "example_stats", "response_loss", "trainable"]
