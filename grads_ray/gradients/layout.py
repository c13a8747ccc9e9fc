"""Where each example's positions are in a tensor a module sees, whatever layout the model uses.

A batch of B padded examples of T tokens reaches a module as one of these layouts (F: the feature
axis, always last):

- (B, T, F): the usual one;
- (B, T, H, F): per-head norms applied before the heads are moved (Qwen3's q/k norms);
- (B, H, T, F): per-head norms applied after (Gemma3's);
- (B·T, F) or (1, B·T, F): tokens flattened (OPT's MLP and final norm, every MoE router);
- (B·T·k, F), (B·T, k, F): flattened with k positions a token (per-head gated norms of linear
  attention, Qwen3-Next and Qwen3.5); (B·H, T, F): heads merged into the batch axis.

:func:`token_layout` maps such a shape to a view (B, P, F), P positions per example, and the mask of
the real tokens among them. Every per-example gradient rule sums over an example's positions, so
which position is which never matters, only which example and whether the token is real.
(B, T, H, F) and (B, H, T, F) look alike when H == T; the (B, T, …) reading is taken, and the mask
is then a safeguard only: the output gradient is exactly zero at padded positions (no loss there,
and attention never reads a masked key), so the sums are the same either way. A flattened layout is read example-major, as any reshape of a batch-first
tensor is; a model that keeps its sequence axis first would be misread, and its self-check fails.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class Layout:
    """How a tensor of shape (*lead, F) holds B examples of T tokens."""

    b: int
    positions: int  # P: positions per example
    kind: str  # "btf" | "bt*f" | "bh*tf" | "flat" | "flat1" | "flat*" | "b"
    lead: tuple[int, ...]

    def view(self, x: torch.Tensor) -> torch.Tensor:
        """(*lead, F) -> (B, P, F); any tensor with this layout's leading dims (an input or its δ)."""
        return x.reshape(self.b, self.positions, x.shape[-1])

    def mask(self, mask: torch.Tensor) -> torch.Tensor:
        """The (B, T) real-token mask -> (B, P) for this layout's positions."""
        b, t = mask.shape
        if self.kind in ("btf", "flat", "flat1"):
            return mask
        if self.kind == "b":
            return mask.any(1, keepdim=True)
        if self.kind in ("bt*f", "flat*"):  # each token's mask repeated for its positions, token-major
            rest = self.positions // t
            return mask[:, :, None].expand(b, t, rest).reshape(b, self.positions)
        rest = self.positions // t  # bh*tf
        return mask[:, None, :].expand(b, rest, t).reshape(b, self.positions)


def token_layout(lead: tuple[int, ...], b: int, t: int) -> Layout | None:
    """The layout of a tensor whose leading dims (all but the feature axis) are ``lead``, in a batch of
    ``b`` examples of ``t`` tokens; None when the examples cannot be told apart in it (a module that
    sees gathered rows, a batch dimension mixed with another)."""
    lead = tuple(int(n) for n in lead)
    if lead == (b, t):
        return Layout(b, t, "btf", lead)
    if len(lead) >= 3 and lead[0] == b and lead[1] == t:
        return Layout(b, _prod(lead[1:]), "bt*f", lead)
    if len(lead) == 3 and lead[0] == b and lead[2] == t:
        return Layout(b, lead[1] * t, "bh*tf", lead)
    if lead == (b * t,):
        return Layout(b, t, "flat", lead)
    if lead == (1, b * t):
        return Layout(b, t, "flat1", lead)
    if lead and lead[0] % (b * t) == 0 and (lead[0] > b * t or len(lead) > 1):
        # tokens flattened with more per token: (B·T·k,) for k slots a token (a MoE's token-major
        # pairs), (B·T, heads) or (B·T·heads,) for a per-head norm after flattening (gated linear attention)
        return Layout(b, t * (lead[0] // (b * t)) * _prod(lead[1:]), "flat*", lead)
    if len(lead) == 2 and lead[1] == t and lead[0] % b == 0 and lead[0] > b:
        return Layout(b, lead[0] // b * t, "bh*tf", lead)  # heads merged into the batch axis: (B·H, T)
    if lead == (b,):  # one vector per example (a pooler): its one position counts
        return Layout(b, 1, "b", lead)
    return None


def index_layout(shape: tuple[int, ...], b: int, t: int) -> str | None:
    """How an embedding lookup's index (no feature axis) holds the batch: ``"bt"`` (B, T), ``"flat"``
    (B·T,), ``"shared"`` (1, T) or (T,): one row of indices for every example (positions computed as
    ``arange``), which the engine expands to (B, T) so each example has its own lookup; else None."""
    shape = tuple(int(n) for n in shape)
    if shape == (b, t):
        return "bt"
    if shape == (b * t,):
        return "flat"
    if shape in ((1, t), (t,)) and b > 1:
        return "shared"
    return None


def _prod(xs) -> int:
    out = 1
    for x in xs:
        out *= int(x)
    return out
