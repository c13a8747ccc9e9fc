"""Hidden-state features of each example, shared by every gradient engine.

``hidden_mean``: the mean last hidden state over the response tokens (content, not the template).
FisherSFT (arXiv 2505.14826) linearises the model at its last layer: predicting token t+1 is a
multinomial logistic regression on h_t, whose Fisher information is bounded by Σ_t h_t h_tᵀ (up to
the softmax covariance, ‖diag(p) − ppᵀ‖ ≤ 1). Its greedy step needs, per example, that sum in a
reduced space: z_t = P h_t with a fixed Gaussian P (d' × d), kept as a rank-r factor F (r × d'),
FᵀF the best rank-r approximation of Σ_t z_t z_tᵀ (d'² numbers would not scale to 10^7 examples).
"""

from __future__ import annotations

import numpy as np
import torch


def fisher_projection(hidden: int, dim: int, rank: int, seed: int) -> tuple[torch.Tensor | None, int]:
    """The fixed projection P (d', d) float64, N(0, 1/d') entries, and the effective rank; (None, 0)
    when the summary is off (``dim`` or ``rank`` 0). d' and r never exceed the hidden size."""
    if not dim or not rank:
        return None, 0
    dim = min(dim, hidden)
    gen = torch.Generator().manual_seed(seed * 104729 + 3)
    return torch.randn((dim, hidden), generator=gen, dtype=torch.float64) / dim**0.5, min(rank, dim)


def mean_over(hidden: torch.Tensor, where: torch.Tensor) -> torch.Tensor:
    """Mean of hidden (B, T, d) over the positions where ``where`` (B, T) holds -> (B, d)."""
    w = where[..., None].to(hidden.dtype)
    return (hidden * w).sum(1) / w.sum(1).clamp(min=1)


def fisher_summary(hidden: torch.Tensor, target: torch.Tensor, proj: torch.Tensor, rank: int
                   ) -> tuple[np.ndarray, np.ndarray]:
    """FisherSFT's per-example information: the last layer linearised, example i contributes
    Σ_t z_t z_tᵀ over the positions t that predict a response token, z_t = proj · h_t (d').
    Kept as its top-``rank`` factor F_i (r, d') with F_iᵀF_i the best rank-r approximation, and the
    share of the trace it keeps. hidden (B, T, d), target (B, T) bool -> ((B, r, d') float32, (B,))."""
    return fisher_from_gram(fisher_gram(hidden, target, proj).cpu().numpy(), rank)


def fisher_gram(hidden: torch.Tensor, target: torch.Tensor, proj: torch.Tensor) -> torch.Tensor:
    """Σ_t z_t z_tᵀ per example, z = proj · h over the positions where ``target`` holds.
    hidden (B, T, d), target (B, T) bool, proj (d', d) -> (B, d', d') float64 on hidden's device."""
    z = (hidden @ proj.T) * target[..., None]  # (B, T, d')
    return torch.bmm(z.transpose(1, 2), z).double()


def fisher_from_gram(gram: np.ndarray, rank: int) -> tuple[np.ndarray, np.ndarray]:
    """Top-``rank`` factor of each Gram matrix, on the host (a small eigenproblem per example; on a GPU
    the solver would wait for the device): gram (B, d', d') float64 -> (factor (B, r, d') float32,
    energy (B,) float64, the share of the trace the factor keeps)."""
    vals, vecs = np.linalg.eigh(gram)  # ascending
    vals = np.clip(vals, 0.0, None)
    top, topv = vals[:, -rank:][:, ::-1], vecs[:, :, -rank:][:, :, ::-1]  # (B, r), (B, d', r)
    factor = np.transpose(topv * np.sqrt(top)[:, None, :], (0, 2, 1))  # (B, r, d')
    energy = top.sum(1) / np.clip(vals.sum(1), 1e-300, None)
    return factor.astype(np.float32), energy


def response_only(input_ids: list[np.ndarray], labels: list[np.ndarray], start_id: int
                  ) -> tuple[list[np.ndarray], list[np.ndarray]]:
    """IFD's unconditioned input: each example's response tokens alone (every token that carries a
    label, turns concatenated for chats) after one start token, so the first response token is
    predicted too and the loss covers the same tokens as the conditioned loss.
    -> (input_ids, labels) lists, labels -100 on the start token."""
    ids_out, lab_out = [], []
    for x, y in zip(input_ids, labels, strict=True):
        resp = np.asarray(x)[np.asarray(y) != -100]
        ids_out.append(np.concatenate([[start_id], resp]).astype(np.int64))
        lab_out.append(np.concatenate([[-100], resp]).astype(np.int64))
    return ids_out, lab_out


@torch.no_grad()
def mean_token_losses(model: torch.nn.Module, input_ids: torch.Tensor, labels: torch.Tensor,
                      attention_mask: torch.Tensor) -> np.ndarray:
    """Each example's mean next-token loss over its labelled tokens (position ids from the mask
    where a row is left-padded). (B, T) x3 -> (B,) float64; NaN where an example has no labelled token."""
    from grads_ray.data.batching import left_padded_positions

    positions = left_padded_positions(attention_mask)
    extra = {} if positions is None else {"position_ids": positions}
    logits = model(input_ids=input_ids, attention_mask=attention_mask, **extra).logits
    target = labels[:, 1:]
    tok = torch.nn.functional.cross_entropy(logits[:, :-1].float().transpose(1, 2), target.clamp(min=0),
                                            reduction="none")  # (B, T-1)
    keep = (target != -100).to(tok.dtype)
    count = keep.sum(1)
    loss = (tok * keep).sum(1) / count.clamp(min=1)
    return torch.where(count > 0, loss, torch.nan).double().cpu().numpy()
