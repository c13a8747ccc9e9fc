"""Per-example gradient moments of a stack of matrices without the gradients ever in memory.

The formed path (``factored.formed_moments``) writes every example's G_e = L_eᵀ R_e to memory (one
batched matrix product), then reads it twice (sum of squares; max and min). On a GPU those blocks are
as large as B copies of the model's weights: at Qwen2.5-0.5B's shapes (B = 16, T = 512, bf16) 16 GB
written and 32 GB read a pass (``benchmarks/traffic.py``). Here one Triton kernel forms each
(BLOCK_M × BLOCK_N) tile of G_e in registers, float32 sums of exact half-precision products, and
keeps only the tile's sum, sum of squares, max and min; the tiles' partials are then reduced per example
(float64 across tiles, in a fixed order: deterministic). Nothing but (E, tiles, 4) numbers is written.

For bfloat16/float16 factors on a CUDA device, with ``score.fused_moments`` on; float32 factors too
(the products then in IEEE float32, not TF32): a half-precision model's self-check runs its float32
pass through the kernel, where a wrong kernel cannot hide in bfloat16's rounding. On a CPU the same
kernel runs in Triton's interpreter (``TRITON_INTERPRET=1``, numpy): the tests check it there against
float64.

Shapes: E = N·B (parameters × examples), P positions, left (E, P, R), right (E, P, C); padding zero.
"""

from __future__ import annotations

import functools
import logging
import os

import torch

from grads_ray.gradients.factored import HALF

log = logging.getLogger("grads_ray")

# One tile shape, never autotuned: another shape sums a tile in another order (the last bits move), and
# a run must be deterministic. 128 x 128 x 64 in 8 warps is Triton's usual bf16 GEMM tile on an H100;
# benchmarks/grad_stats.py --fused-tiles times others (not yet measured on a GPU).
BLOCK_M, BLOCK_N, BLOCK_K = 128, 128, 64
NUM_WARPS, NUM_STAGES = 8, 3


def set_tiles(m: int, n: int, k: int, warps: int, stages: int) -> None:
    """Another tile shape and launch for this process (benchmarks only)."""
    global BLOCK_M, BLOCK_N, BLOCK_K, NUM_WARPS, NUM_STAGES
    BLOCK_M, BLOCK_N, BLOCK_K, NUM_WARPS, NUM_STAGES = m, n, k, warps, stages


_WORKS: dict[tuple[str, torch.dtype], bool] = {}


def usable(x: torch.Tensor) -> bool:
    """Whether the fused kernel can take factors like x: half precision or float32, on CUDA (or on a CPU under
    Triton's interpreter), with Triton importable, and the kernel compiled and right on a small
    problem on this device (once per device and dtype: a GPU without bfloat16 tensor cores, or with
    less shared memory than the tiles need, keeps the formed path, said once in the log)."""
    if x.dtype not in (*HALF, torch.float32):
        return False
    if x.device.type != "cuda" and not (x.device.type == "cpu" and os.environ.get("TRITON_INTERPRET") == "1"):
        return False
    key = (str(x.device), x.dtype)
    if key not in _WORKS:
        _WORKS[key] = _probe(x.device, x.dtype)
    return _WORKS[key]


def _probe(device: torch.device, dtype: torch.dtype) -> bool:
    """The kernel on one small known problem: G = 1·1ᵀ summed over 3 positions, every entry 3."""
    try:
        import triton  # noqa: F401
    except ImportError:
        log.warning("[grads-ray] score.fused_moments: triton is not installed; the formed path is used")
        return False
    ones = torch.ones((1, 3, 5), dtype=dtype, device=device)
    try:
        s, ss, mx, mn = (float(v) for v in block_moments(ones, ones))
    except Exception as exc:  # noqa: BLE001 - whatever stops the kernel here, the formed path stands
        log.warning("[grads-ray] score.fused_moments: the kernel does not run on %s in %s (%s: %s); the formed "
                    "path is used", device, dtype, type(exc).__name__, str(exc).splitlines()[0][:200] if str(exc) else "")
        return False
    if (s, ss, mx, mn) != (75.0, 225.0, 3.0, 3.0):
        log.warning("[grads-ray] score.fused_moments: the kernel gave %s on a known problem on %s; the formed path "
                    "is used", (s, ss, mx, mn), device)
        return False
    return True


@functools.cache
def _kernel(interpret: bool):
    """The Triton kernel, made once per mode (the interpreter is chosen when a kernel is defined)."""
    import triton
    import triton.language as tl

    @triton.jit
    def moments(left, right, index, rows_right, keep, out, P, Q, R, C, s_le, s_lp, s_lr, s_re, s_rp, s_rc,
                s_ie, s_ip, s_we, s_wp, s_wc, s_ke, s_kp, tiles_n,
                BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr, UPCAST: tl.constexpr, ROWS: tl.constexpr,
                KEEP: tl.constexpr, IEEE: tl.constexpr):
        tile = tl.program_id(0)  # tiles on the grid's first axis: a vocabulary-sized head has more than 65,535
        e = tl.program_id(1).to(tl.int64)  # a stack's offsets can pass 2^31
        rows = (tile // tiles_n) * BM + tl.arange(0, BM)
        cols = (tile % tiles_n) * BN + tl.arange(0, BN)
        ks = tl.arange(0, BK)
        acc = tl.zeros((BM, BN), dtype=tl.float32)
        for k0 in range(0, P, BK):  # the dense term: Σ_p left[e, p, rows] ⊗ right[e, p, cols]
            k = k0 + ks
            real = k < P
            if KEEP:  # padding read as zeros (whatever it holds, NaN included): both factors masked
                real = real & (tl.load(keep + e * s_ke + k * s_kp, mask=k < P, other=0) != 0)
            a = tl.load(left + e * s_le + k[None, :] * s_lp + rows[:, None] * s_lr,
                        mask=real[None, :] & (rows[:, None] < R), other=0.0)  # (BM, BK): L_eᵀ's tile
            b = tl.load(right + e * s_re + k[:, None] * s_rp + cols[None, :] * s_rc,
                        mask=real[:, None] & (cols[None, :] < C), other=0.0)  # (BK, BN)
            if UPCAST:  # the interpreter's dot of bfloat16 is wrong (triton 3.9); float32 products of
                a = a.to(tl.float32)  # half values are exact, so the numbers are the GPU's
                b = b.to(tl.float32)
            if IEEE:  # float32 factors: exact float32 products, as the formed path's (not TF32)
                acc += tl.dot(a, b, input_precision="ieee")
            else:
                acc += tl.dot(a, b)
        if ROWS:  # sparse rows (an embedding tied to the head): Σ_q e_{index[e, q]} ⊗ rows_right[e, q, cols]
            for k0 in range(0, Q, BK):
                k = k0 + ks
                at = tl.load(index + e * s_ie + k * s_ip, mask=k < Q, other=-1)  # (BK,), -1: no row
                first = (tile // tiles_n) * BM
                # A chunk of tokens none of which is one of this tile's rows adds nothing: skipped, so a
                # vocabulary's head (T tokens hit at most T of its ~V/BM row tiles) costs little here
                if tl.sum(((at >= first) & (at < first + BM)).to(tl.int32), axis=0) > 0:
                    b = tl.load(rows_right + e * s_we + k[:, None] * s_wp + cols[None, :] * s_wc,
                                mask=(k[:, None] < Q) & (cols[None, :] < C), other=0.0)
                    hot = at[None, :] == rows[:, None]  # (BM, BK) one-hot, in registers only
                    if UPCAST:
                        acc += tl.dot(hot.to(tl.float32), b.to(tl.float32))
                    elif IEEE:
                        acc += tl.dot(hot.to(b.dtype), b, input_precision="ieee")
                    else:
                        acc += tl.dot(hot.to(b.dtype), b)
        inside = (rows[:, None] < R) & (cols[None, :] < C)
        total = tl.sum(tl.sum(acc, axis=1), axis=0)  # entries outside the matrix are 0
        ss = tl.sum(tl.sum(acc * acc, axis=1), axis=0)
        hi = tl.max(tl.max(tl.where(inside, acc, float("-inf")), axis=1), axis=0)
        lo = tl.min(tl.min(tl.where(inside, acc, float("inf")), axis=1), axis=0)
        at = out + (e * tl.num_programs(0) + tile) * 4
        tl.store(at, total)
        tl.store(at + 1, ss)
        tl.store(at + 2, hi)
        tl.store(at + 3, lo)

    return moments


def block_moments(left: torch.Tensor, right: torch.Tensor, index: torch.Tensor | None = None,
                  rows_right: torch.Tensor | None = None) -> tuple[torch.Tensor, ...]:
    """left (E, P, R), right (E, P, C), in one dtype :func:`usable` takes, padding zero -> per example e the sum, sum of
    squares, max and min of G_e's entries, G_e = Σ_p left[e, p] ⊗ right[e, p], (E,) float64 each. With ``index``
    (E, Q) long (-1: no row) and ``rows_right`` (E, Q, C) (``factored.Rows``, an embedding tied to the
    head), G_e also gets Σ_q e_{index[e, q]} ⊗ rows_right[e, q], the one-hot rows built in registers."""
    return reduce_tiles(tile_moments(left, right, index, rows_right)).unbind(-1)


def tiles(rows: int, cols: int) -> int:
    """Tiles of one (rows × cols) matrix."""
    return -(-rows // BLOCK_M) * -(-cols // BLOCK_N)


def tile_moments(left: torch.Tensor, right: torch.Tensor, index: torch.Tensor | None = None,
                 rows_right: torch.Tensor | None = None, *, keep: torch.Tensor | None = None,
                 out: torch.Tensor | None = None) -> torch.Tensor:
    """As :func:`block_moments`, each tile's sum, sum of squares, max and min, (E, tiles, 4) float32, into
    ``out`` when given. ``keep`` (E, P) bool: the positions that count; the others are read as zeros
    whatever they hold, so unmasked factors (views of what the pass captured) can come as they are."""
    e, p, r = left.shape
    c = right.shape[-1]
    rows = index is not None
    if not rows:  # unused arguments (their branches are compiled out)
        index, rows_right = torch.zeros((1, 1), dtype=torch.long, device=left.device), right
    masked = keep is not None
    keep = keep.view(torch.uint8) if masked and keep.dtype == torch.bool else keep if masked else index
    q = index.shape[1] if rows else 0
    n_tiles = tiles(r, c)
    if out is None:
        out = torch.empty((e, n_tiles, 4), dtype=torch.float32, device=left.device)
    assert out.shape == (e, n_tiles, 4) and out.is_contiguous() and (not masked or keep.shape == left.shape[:2])
    interpret = left.device.type == "cpu"
    extra = {} if interpret else {"num_warps": NUM_WARPS, "num_stages": NUM_STAGES}
    ieee = left.dtype == torch.float32
    block_k = BLOCK_K // 2 if ieee else BLOCK_K  # float32 tiles in the shared memory of an A100 too
    _kernel(interpret)[(n_tiles, e)](
        left, right, index, rows_right, keep, out, p, q, r, c, *left.stride(), *right.stride(), *index.stride(),
        *rows_right.stride(), *keep.stride(), -(-c // BLOCK_N), BM=BLOCK_M, BN=BLOCK_N, BK=block_k,
        UPCAST=interpret, ROWS=rows, KEEP=masked, IEEE=ieee and not interpret, **extra)
    return out


def reduce_tiles(out: torch.Tensor) -> torch.Tensor:
    """Tiles' numbers (…, tiles, 4) -> per example the sum and sum of squares (float64 across tiles),
    max and min, (…, 4) float64, in a fixed order; four ops, whatever the stack."""
    sums = out[..., :2].sum(-2, dtype=torch.float64)  # float32 tiles summed in float64 (no float64 copy)
    return torch.cat([sums, out[..., 2:3].amax(-2), out[..., 3:4].amin(-2)], dim=-1)  # (exact: float32 -> 64)
