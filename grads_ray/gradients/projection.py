"""A fixed, seeded random projection of a whole per-example gradient to ``dim`` numbers.

Two stages, both linear, so the projection of g_i is one fixed matrix M (dim × P) applied to it:
1. per parameter, a Gaussian sketch small enough to apply inside its layer: a matrix parameter
   (rows × cols; a stack of E matrices, as a MoE layer's experts, counts as one (E·rows) × cols) gets the Kronecker form P_r G P_cᵀ with P_r (k_r × rows), P_c (k_c × cols),
   k = min(size, ``rank``) (LoGra, arXiv 2405.13954: never forms G); a vector parameter (n,) gets a
   dense P_v (min(n, rank²) × n). Entries N(0, 1/k) so E‖sketch‖² = ‖g‖².
2. the per-parameter sketches, side by side (``inner`` numbers), go through a count sketch to
   ``dim``: coordinate j is added, with a random sign, into one random bucket. Also norm-preserving
   in expectation, and O(inner) to apply whatever ``dim`` is.

Each parameter's matrices come from its own generator seeded by (seed, its name), drawn in float64 on
the CPU: the same projection on every machine, device and dtype, and the same columns whatever other
parameters are trainable.
"""

from __future__ import annotations

import zlib

import torch


def _gaussian(shape: tuple[int, int], seed: int, name: str, scale_dim: int) -> torch.Tensor:
    gen = torch.Generator().manual_seed((seed * 1_000_003 + zlib.crc32(name.encode())) % (2**63))
    return torch.randn(shape, generator=gen, dtype=torch.float64) / scale_dim**0.5


class Projector:
    """Projection matrices for the named trainable parameters, in a fixed order.

    ``blocks[name]`` is ``(p_rows, p_cols)`` for a matrix parameter or ``(p_vec,)`` for a vector;
    ``offsets[name]`` the slice of the ``inner`` vector its sketch fills.
    """

    def __init__(self, shapes: dict[str, tuple[int, ...]], dim: int, rank: int = 8, seed: int = 0):
        if dim < 1 or rank < 1:
            raise ValueError(f"projection dim and rank must be >= 1, got dim={dim} rank={rank}")
        self.dim, self.rank, self.seed = dim, rank, seed
        self.blocks: dict[str, tuple[torch.Tensor, ...]] = {}
        self.offsets: dict[str, slice] = {}
        start = 0
        for name, shape in shapes.items():
            if len(shape) > 2:  # stacked matrices (a MoE layer's experts): one (E·R) × C matrix
                shape = (_prod(shape[:-1]), shape[-1])
            if len(shape) == 2:
                kr, kc = min(shape[0], rank), min(shape[1], rank)
                self.blocks[name] = (_gaussian((kr, shape[0]), seed, name + ":rows", kr),
                                     _gaussian((kc, shape[1]), seed, name + ":cols", kc))
                width = kr * kc
            elif len(shape) == 1:
                kv = min(shape[0], rank * rank)
                self.blocks[name] = (_gaussian((kv, shape[0]), seed, name + ":vec", kv),)
                width = kv
            else:
                raise ValueError(f"cannot project parameter {name} of shape {tuple(shape)}")
            self.offsets[name] = slice(start, start + width)
            start += width
        self.inner = start
        gen = torch.Generator().manual_seed(seed * 7919 + 17)
        self.bucket = torch.randint(0, dim, (self.inner,), generator=gen)  # (inner,)
        self.sign = torch.randint(0, 2, (self.inner,), generator=gen).to(torch.float64) * 2 - 1
        self._cache: dict[tuple, tuple] = {}

    def on(self, device: torch.device, dtype: torch.dtype) -> Projector:
        """Move the matrices once to where the engine runs (cached per device and dtype)."""
        key = (str(device), dtype)
        if key not in self._cache:
            self._cache[key] = ({n: tuple(m.to(device, dtype) for m in b) for n, b in self.blocks.items()},
                                self.bucket.to(device), self.sign.to(device, dtype))
        return self._cache[key]

    def split_on(self, device: torch.device, dtype: torch.dtype, name: str) -> tuple[torch.Tensor, ...]:
        """One matrix parameter's sketch matrices transposed, P_rᵀ (R, 2k_r) and P_cᵀ (C, 2k_c), each as
        ``factored.split_half`` in half dtype ``dtype``: for factors multiplied in their own dtype
        (cached per device, dtype and parameter)."""
        from grads_ray.gradients.factored import split_half

        key = (str(device), dtype, name)
        if key not in self._cache:
            self._cache[key] = tuple(split_half(m.T.to(device), dtype) for m in self.blocks[name])
        return self._cache[key]

    def sketch(self, inner: torch.Tensor) -> torch.Tensor:
        """Stage 2: (B, inner) -> (B, dim) count sketch."""
        _, bucket, sign = self.on(inner.device, inner.dtype)
        out = torch.zeros((inner.shape[0], self.dim), dtype=inner.dtype, device=inner.device)
        return out.index_add_(1, bucket, inner * sign)

    def project_param(self, name: str, g: torch.Tensor) -> torch.Tensor:
        """One parameter's whole gradient of one example -> its stage-1 sketch (its ``offsets`` slice of
        ``inner``), float64, on g's device."""
        blocks = self.on(g.device, torch.float64)[0][name]
        g = g.to(torch.float64)
        g = g.reshape(-1, g.shape[-1]) if g.dim() > 2 else g
        return (blocks[0] @ g @ blocks[1].T if len(blocks) == 2 else blocks[0] @ g).reshape(-1)

    def project_full(self, grads: dict[str, torch.Tensor]) -> torch.Tensor:
        """Reference form: whole per-parameter gradients of one example -> (dim,) float64.
        The engine must agree with this without ever forming the gradients."""
        inner = torch.zeros(self.inner, dtype=torch.float64)
        for name, block in self.blocks.items():
            g = grads[name].to(torch.float64)
            g = g.reshape(-1, g.shape[-1]) if g.dim() > 2 else g
            part = block[0] @ g @ block[1].T if len(block) == 2 else block[0] @ g
            inner[self.offsets[name]] = part.reshape(-1)
        return self.sketch(inner[None])[0]


def _prod(xs) -> int:
    out = 1
    for x in xs:
        out *= int(x)
    return out
