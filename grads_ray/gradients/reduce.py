"""The engine's reduction: what the pass holds of each parameter's uses until they are reduced, and
the reduction itself (gradients/engine.py runs the pass; this module turns what it held into numbers).

A parameter whose uses are all in (:meth:`Reducer.add`) either waits for its stack (same kind, shapes,
dtypes, mask and layout: every layer's q, every layer's k, …) or, when stacking does not apply (a tied
weight, an embedding, a replayed matrix, one large head), is reduced alone; a mixture of experts'
weight is reduced at once, its (expert, example) blocks stacked (``gradients.experts``). A stack is
reduced by :meth:`Reducer.flush` in one pass of kernels (``gradients.grouped``) when ``hold_bytes`` of
factors are held, or when backward ends. Every per-example number lands in the pass's moment table
(params, 4, B) and count sketch (B, dim); nothing here waits for the device.
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.overrides import TorchFunctionMode

from grads_ray.gradients import grouped
from grads_ray.gradients.factored import (
    HALF,
    Dense,
    Rows,
    acc_dtype,
    fused_usable,
    half_out,
    matrix_moments,
    project_terms,
    vector_moments,
)
from grads_ray.gradients.layout import Layout
from grads_ray.gradients.profiling import part
from grads_ray.gradients.projection import Projector
from grads_ray.gradients.rules import LOOP_HINT, NormHat, UnsupportedModel


@dataclass
class Held:
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
class PassState:
    mask: torch.Tensor  # (B, T) bool, real tokens
    table: torch.Tensor  # (params, 4, B) float64: every parameter's per-example moments (zero: unused)
    sketch: torch.Tensor | None  # (B, proj_dim) float64, the projected gradient (``Reducer.finish_sketch``)
    pending: dict[str, int] = field(default_factory=lambda: defaultdict(int))
    terms: dict[str, list[Held]] = field(default_factory=lambda: defaultdict(list))
    ready: list[tuple[str, Held]] = field(default_factory=list)  # complete, waiting for their stack
    held: int = 0  # bytes in ``ready``
    keeps: dict[tuple, torch.Tensor] = field(default_factory=dict)
    inner: list[tuple[tuple[str, ...], torch.Tensor]] = field(default_factory=list)  # stage-1 sketches, by stack
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


def common_dtype(*xs: torch.Tensor) -> list[torch.Tensor]:
    """The tensors in their promoted dtype (a bf16 δ against a float32 input: both float32)."""
    dt = xs[0].dtype
    for x in xs[1:]:
        dt = torch.promote_types(dt, x.dtype)
    return [x.to(dt) for x in xs]


class Reducer:
    """Reduces one model's parameters' per-example gradients into a pass's moment table and sketch.

    ``params``: the trainable parameters by name (the table's rows in this order); ``projector``: the
    count-sketch projection (None: no sketch); ``extrema`` False skips max/min; ``chunk_elements``
    bounds formed gradient blocks; ``hold_bytes`` bounds the factors held before a flush; ``fused``
    reduces the matrices' blocks with ``gradients.fused`` where it can run."""

    def __init__(self, params: dict[str, nn.Parameter], projector: Projector | None, *, extrema: bool,
                 chunk_elements: int, hold_bytes: int, fused: bool = False):
        self.params, self.projector = params, projector
        self.extrema, self.chunk_elements, self.hold_bytes, self.fused = extrema, chunk_elements, hold_bytes, fused
        self.row = {n: i for i, n in enumerate(params)}  # the moment table's row of each parameter
        self._stacks: dict[tuple, dict[str, torch.Tensor]] = {}  # per stack of names: its rows, blocks, buckets

    def add(self, state: PassState, name: str, held: Held) -> None:
        state.terms[name].append(held)
        state.pending[name] -= 1
        if state.pending[name] == 0:
            self.complete(state, name)

    def complete(self, state: PassState, name: str) -> None:
        """All uses of one parameter are in. A parameter with one use of a stackable kind waits for
        its stack; a mixture of experts' weight is reduced now, all its experts as one stack; one used
        several times (a tied weight, a module called twice), an embedding, a replayed matrix, or one
        whose factors alone are a quarter of ``hold_bytes`` (an untied head's δ over the vocabulary:
        its kernels are large already) is reduced now, on its own."""
        held = state.terms.pop(name, [])
        state.pending[name] = 0
        if not held:  # no δ reached it: its per-example gradient is exactly zero (the table's default)
            return
        if held[0].kind == "expert":  # a mixture of experts' weight: all its experts at once
            with part("experts"):
                self._reduce_experts(state, name, held)
            return
        if len(held) == 1 and held[0].kind != "term" and held[0].nbytes() <= self.hold_bytes // 4:
            state.ready.append((name, held[0]))
            state.held += held[0].nbytes()
            if state.held > self.hold_bytes:
                self.flush(state)
            return
        with part("alone"):  # a tied or several-times-used weight, an embedding, a replayed matrix
            dense = [h for h in held if h.kind == "dense"]
            rows = [h.value for h in held if h.kind == "term" and isinstance(h.value, Rows)]
            if len(dense) == 1 and len(dense) + len(rows) == len(held) <= 2 and self._unstacked(dense[0]):
                self._reduce_alone_fused(state, name, dense[0], rows[0] if rows else None)
            else:
                self._reduce_alone(state, name, [self._materialize(h) for h in held])

    def _materialize(self, held: Held):
        """One use as a term of ``factored``, padding zeroed (a formed (B, …) tensor for vectors)."""
        if held.kind in ("term", "vector"):
            return held.value
        if held.kind == "dense":
            keep = held.keep[..., None]
            return Dense(*common_dtype(torch.where(keep, held.left, 0.0), torch.where(keep, held.right, 0.0)))
        return self._vectors(held.kind, [held])[0]

    def _vectors(self, kind: str, members: list[Held]) -> torch.Tensor:
        """N uses of vector parameters of one kind and shape -> their per-example gradients (N, B, n)."""
        if kind == "vector":
            return torch.stack([h.value for h in members])
        first = members[0]
        if self.fused:
            got = self._vectors_in_place(kind, members)
            if got is not None:
                return got
        delta = grouped.stacked([h.left for h in members], first.keep)  # (N, B, P, n)
        if kind == "bias":
            return delta.sum(2)
        x = torch.stack([h.right for h in members])  # norm: (N, *input), its x̂ once for the stack
        hat = first.hat(None, None, x).reshape(delta.shape)
        return (delta * grouped.zero_padding_(hat, first.keep)).sum(2)

    def _vectors_in_place(self, kind: str, members: list[Held]) -> torch.Tensor | None:
        """:meth:`_vectors` by ``gradients.fused``'s vector kernel (``fused`` on, where it runs and the
        use's rule is one of its modes): each member's δ (and a norm's input) read where the pass left
        them, x̂ formed in registers; no stack, no x̂, no product in memory. -> (N, B, n) float32, or None."""
        from grads_ray.gradients import fused

        first = members[0]
        mode = fused.vector_mode(kind, first.hat, first.right)
        if mode is None or not fused.vector_usable(first.left, None if mode == 0 else first.right, mode):
            return None
        b, p, n = first.left.shape
        out = torch.empty((len(members), b, -(-p // fused.VEC_ROWS), n), dtype=torch.float32, device=first.left.device)
        for j, h in enumerate(members):
            x = None if mode == 0 else h.layout.view(h.right)
            fused.vector_sums(h.left, x, h.keep, mode, h.hat.eps if h.hat else 0.0, out=out[j])
        return out.sum(2)

    def flush(self, state: PassState) -> None:
        """Reduce every stack of the uses that are ready: one pass of kernels per distinct shape."""
        stacks: dict[tuple, list[tuple[str, Held]]] = defaultdict(list)
        for name, held in state.ready:
            stacks[held.key()].append((name, held))
        state.ready, state.held = [], 0
        for key, members in stacks.items():
            names = tuple(n for n, _ in members)
            helds = [h for _, h in members]
            if key[0] == "dense" and self._unstacked(helds[0]):
                self._flush_unstacked(state, names, helds)
            elif key[0] == "dense":
                keep = helds[0].keep
                with part("dense_stack"):
                    left, right = common_dtype(grouped.stacked([h.left for h in helds], keep),
                                               grouped.stacked([h.right for h in helds], keep))
                with part("dense_moments"):
                    self._store(state, names, grouped.dense_moments(left, right, extrema=self.extrema,
                                                                    chunk_elements=self.chunk_elements, fused=self.fused))
                if self.projector:
                    with part("dense_sketch"):
                        blocks = self._stack(names, left.device, acc_dtype(left))
                        split = self._stack(names, left.device, left.dtype)["split"] if half_out(left) else None
                        self._sketch(state, names, grouped.dense_project(left, right, blocks["p_rows"],
                                                                         blocks["p_cols"], split))
            else:
                with part("vectors"):
                    g = self._vectors(key[0], helds)
                    self._store(state, names, grouped.vector_moments_stack(g, extrema=self.extrema))
                    if self.projector:
                        self._sketch(state, names,
                                     grouped.vector_project(g, self._stack(names, g.device, acc_dtype(g))["p_vec"]))

    def _unstacked(self, first: Held) -> bool:
        """Whether a dense use is reduced in place, unmasked, by ``gradients.fused``'s kernel (``fused`` on,
        with extrema, where the kernel takes its factors): no stacked or masked copy of them."""
        return self.fused and self.extrema and fused_usable([Dense(first.left, first.right)])

    def _flush_unstacked(self, state: PassState, names: tuple[str, ...], helds: list[Held]) -> None:
        lefts, rights, keep = [h.left for h in helds], [h.right for h in helds], helds[0].keep
        with part("dense_moments"):
            self._store(state, names, grouped.unstacked_moments(lefts, rights, keep))
        if self.projector:
            with part("dense_sketch"):
                dev = lefts[0].device
                blocks = self._stack(names, dev, acc_dtype(lefts[0]))
                split = self._stack(names, dev, lefts[0].dtype)["split"] if half_out(lefts[0]) else None
                self._sketch(state, names, grouped.unstacked_project(lefts, rights, keep, blocks["p_rows"],
                                                                     blocks["p_cols"], split))

    def _stack(self, names: tuple[str, ...], device, acc: torch.dtype | None = None) -> dict[str, torch.Tensor]:
        """A stack's table rows (``index``) and count-sketch ``bucket`` and ``sign`` of its columns; with
        ``acc`` its projection blocks (``p_rows`` (N, k_r, R) and ``p_cols``, or ``p_vec`` (N, k, n));
        with a half dtype for ``acc``, its matrices' ``split`` sketches (P_rᵀ (N, R, 2k_r), P_cᵀ
        (N, C, 2k_c); ``Projector.split_on``). Made once per stack."""
        key = (names, str(device), acc)
        if key not in self._stacks:
            out: dict[str, torch.Tensor] = {}
            if acc in HALF:
                parts = [self.projector.split_on(device, acc, n) for n in names]
                out["split"] = tuple(torch.stack([b[i] for b in parts]) for i in range(2))
            elif acc is None:
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

    def _store(self, state: PassState, names: tuple[str, ...], moments: torch.Tensor) -> None:
        """moments (N, 4, B) float64 -> the table's rows of these parameters."""
        state.table.index_copy_(0, self._stack(names, state.table.device)["index"], moments)

    def _sketch(self, state: PassState, names: tuple[str, ...], inner: torch.Tensor) -> None:
        """Stage-1 sketches (N, B, w) of these parameters, kept for :meth:`finish_sketch` (a few MB a pass)."""
        state.inner.append((names, inner))

    def finish_sketch(self, state: PassState) -> None:
        """Every stage-1 sketch of the pass -> the count sketch (B, dim), in one scatter: each entry
        (n, b, j) of a stack's (N, B, w) added, times its column's sign, at (b, bucket of column (n, j)).
        Four ops a pass, where a scatter per stack took four or five each."""
        if not state.inner:
            return
        flat = torch.cat([x.reshape(-1) for _, x in state.inner]).to(torch.float64)
        where = [self._targets(names, x.shape[1], state.sketch.device) for names, x in state.inner]
        at, sign = (torch.cat([w[i] for w in where]) for i in range(2))
        state.sketch.view(-1).index_add_(0, at, flat * sign)
        state.inner = []

    def _targets(self, names: tuple[str, ...], b: int, device) -> tuple[torch.Tensor, torch.Tensor]:
        """A stack's (N, B, w) entries' places in a (B, dim) count sketch, flattened, and their signs."""
        key = (names, str(device), "targets", b)
        if key not in self._stacks:
            blocks = self._stack(names, device)
            n = len(names)
            bucket = blocks["bucket"].view(n, 1, -1)  # (N, 1, w): each column's bucket
            rows = torch.arange(b, device=device).view(1, b, 1) * self.projector.dim
            sign = blocks["sign"].to(torch.float64).view(n, 1, -1).expand(n, b, -1)
            self._stacks[key] = {"at": (rows + bucket).reshape(-1), "sign": sign.reshape(-1)}
        got = self._stacks[key]
        return got["at"], got["sign"]

    def _reduce_experts(self, state: PassState, name: str, pieces: list[Held]) -> None:
        """A mixture of experts' 3-D weight (E, R, C) or bias (E, out) from its calls' pairs (``left`` δ
        (S, out), ``right`` the input (S, in) or None for a bias, ``value`` (:class:`experts.Pairs`,
        transposed)). Each (expert, example) with pairs is one block, G = Σ δ xᵀ over its pairs; blocks
        of one padded size are one stack (:func:`experts.block_layout`), in chunks under ``hold_bytes``.
        Block moments and sketches land in an (E·B) table, summed over experts per example in a fixed
        order; a block with no pair is zero, as that example's gradient is for that expert."""
        from grads_ray.gradients import experts as moe

        p = self.params[name]
        b, t, n_experts = state.b, state.t, p.shape[0]
        tokens = torch.cat([h.value[0].tokens for h in pieces])
        keep = torch.cat([h.value[0].ok for h in pieces]) & state.mask.reshape(-1)[tokens]
        lay = moe.block_layout(torch.cat([h.value[0].expert for h in pieces]), tokens, keep, b, t, n_experts)
        delta = torch.cat([h.left for h in pieces])[lay.order]
        bias = pieces[0].right is None
        x = None if bias else torch.cat([h.right for h in pieces])[lay.order]
        transposed = pieces[0].value[1]
        dev, n_blocks = delta.device, n_experts * b
        if bias:
            g = delta.new_zeros((n_blocks, delta.shape[-1]))  # each block's sum of δ
        else:
            table = torch.zeros((n_blocks, 4), dtype=torch.float64, device=dev)
            if self.projector:
                p_rows, p_cols = self.projector.on(p.device, acc_dtype(p))[0][name]
                p_rows = p_rows.view(p_rows.shape[0], n_experts, -1).transpose(0, 1)  # (E, k_r, R)
                sketch = torch.zeros((n_blocks, p_rows.shape[1] * p_cols.shape[0]), dtype=p_rows.dtype, device=dev)
        width = (delta.shape[-1] + (0 if bias else x.shape[-1])) * delta.element_size()
        for m, ids, starts in lay.buckets:
            step = max(1, self.hold_bytes // max(m * width, 1))
            for k0 in range(0, len(ids), step):
                k1 = min(k0 + step, len(ids))
                pairs = slice(int(starts[k0]), int(starts[k1]))  # the chunk's blocks' pairs: contiguous
                on = torch.as_tensor(ids[k0:k1], device=dev)
                slot = (lay.local[lay.block[pairs]] - k0) * m + lay.rank[pairs]
                rows = (k1 - k0) * m
                d = moe.stack_pairs(delta[pairs], slot, rows).view(k1 - k0, m, -1)
                if bias:
                    g.index_copy_(0, on, d.sum(1))
                    continue
                d, xs = common_dtype(d, moe.stack_pairs(x[pairs], slot, rows).view(k1 - k0, m, -1))
                left, right = (xs, d) if transposed else (d, xs)  # G = Σ δ xᵀ, or Σ x δᵀ stored (in, out)
                mo = matrix_moments([Dense(left, right)], left.shape[-1], right.shape[-1], extrema=self.extrema,
                                    chunk_elements=self.chunk_elements, fused=self.fused)
                table.index_copy_(0, on, torch.stack([mo.s, mo.ss, mo.mx, mo.mn], 1))
                if self.projector:
                    acc = acc_dtype(left)
                    e = torch.div(on, b, rounding_mode="floor")
                    part = grouped.dense_project(left[:, None], right[:, None], p_rows[e].to(acc),
                                                 p_cols.to(acc).expand(k1 - k0, *p_cols.shape))
                    sketch.index_copy_(0, on, part[:, 0].to(sketch.dtype))
        if bias:  # (B, E, out) formed
            self._reduce_alone(state, name, [g.view(n_experts, b, -1).transpose(0, 1)])
            return
        per = table.view(n_experts, b, 4)  # summed over experts in one fixed order: deterministic
        self._store(state, (name,), grouped.table_rows(per[..., 0].sum(0), per[..., 1].sum(0), per[..., 2].amax(0),
                                                       per[..., 3].amin(0), 1))
        if self.projector:
            self._sketch(state, (name,), sketch.view(n_experts, b, -1).sum(0)[None])

    def _reduce_alone_fused(self, state: PassState, name: str, held: Held, rows: Rows | None) -> None:
        """A head (tied to its embedding: ``rows``, or untied and too large to wait for a stack) through
        ``gradients.fused``'s kernel with its factors as the pass left them: the padding masked as the
        kernel loads them and on the sketch's small products, never on a (B, T, vocabulary) copy."""
        from grads_ray.gradients import fused

        p = self.params[name]
        m = fused.reduce_tiles(fused.tile_moments(held.left, held.right, *((rows.index, rows.right) if rows else ()),
                                                  keep=held.keep))  # (B, 4)
        self._store(state, (name,), m.T[None])
        if self.projector:
            dev = held.left.device
            p_rows, p_cols = self.projector.on(dev, acc_dtype(p))[0][name]
            split = self.projector.split_on(dev, held.left.dtype, name) if half_out(held.left) else None
            inner = grouped.unstacked_project([held.left], [held.right], held.keep, p_rows[None], p_cols[None],
                                              (split[0][None], split[1][None]) if split else None)[0]
            if rows is not None:  # the embedding's rows: masked already (index -1, δ zero)
                inner = inner + project_terms([rows], p_rows, p_cols)
            self._sketch(state, (name,), inner[None])

    def _reduce_alone(self, state: PassState, name: str, terms: list) -> None:
        """One parameter whose uses are not stackable: moments and sketch from its terms."""
        p = self.params[name]
        formed = [t for t in terms if isinstance(t, torch.Tensor)]
        dev = (formed or [t.right for t in terms])[0].device  # where the pass's tensors are
        blocks = self.projector.on(dev, acc_dtype(p))[0] if self.projector else None
        inner = None
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
        else:
            rows, cols = p.shape
            m = matrix_moments(terms, rows, cols, extrema=self.extrema, chunk_elements=self.chunk_elements,
                               fused=self.fused)
            if blocks:
                first = terms[0].right
                split = self.projector.split_on(dev, first.dtype, name) if half_out(first) else None
                inner = project_terms(terms, *blocks[name], split=split)
        self._store(state, (name,), grouped.table_rows(m.s, m.ss, m.mx, m.mn, 1))
        if inner is not None:
            self._sketch(state, (name,), inner[None])


def to_host(pieces: dict[str, torch.Tensor]) -> dict[str, np.ndarray]:
    """Tensors on one device -> numpy arrays of the same shapes and dtypes, through one copy: each
    flattened into float64 (exact for float32, integers below 2^53) side by side."""
    flat = torch.cat([t.reshape(-1).to(torch.float64) for t in pieces.values()]).cpu().numpy()
    out, at = {}, 0
    for k, t in pieces.items():
        n = t.numel()
        out[k] = flat[at:at + n].reshape(tuple(t.shape)).astype(np.float32 if t.dtype == torch.float32 else np.float64)
        at += n
    return out
