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
MIN_CAPABILITY = (8, 0)  # Ampere: bfloat16 tensor cores, and the tiles' registers (gradients/fused_build.py)


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
    if device.type == "cuda" and torch.cuda.get_device_capability(device) < MIN_CAPABILITY:
        log.warning("[grads-ray] score.fused_moments: %s is compute capability %d.%d; the kernels need %d.%d or later "
                    "(built for sm_75, the tiles spill 7 KB a thread to local memory); the formed path is used",
                    device, *torch.cuda.get_device_capability(device), *MIN_CAPABILITY)
        return False
    ones = torch.ones((1, 3, 5), dtype=dtype, device=device)
    return _known("the kernel", device, dtype, lambda: [float(v) for v in block_moments(ones, ones)],
                  [75.0, 225.0, 3.0, 3.0], "")


def _known(what: str, device: torch.device, dtype: torch.dtype, run, want: list[float], where: str) -> bool:
    """Whether ``run()`` gives ``want`` on this device; a kernel that raises or answers otherwise keeps the
    formed path (``where``: for which parameters), said in the log (the callers keep the verdict: once)."""
    try:
        got = run()
    except Exception as exc:  # noqa: BLE001 - whatever stops the kernel here, the formed path stands
        log.warning("[grads-ray] score.fused_moments: %s does not run on %s in %s (%s: %s); the formed path is "
                    "used%s", what, device, dtype, type(exc).__name__,
                    str(exc).splitlines()[0][:200] if str(exc) else "", where)
        return False
    if got != want:
        log.warning("[grads-ray] score.fused_moments: %s gave %s on a known problem on %s (%s wanted); the formed "
                    "path is used%s", what, got, device, want, where)
        return False
    return True


@functools.cache
def _kernel(interpret: bool):
    """The tile kernel, made once per mode (the interpreter is chosen when a kernel is defined)."""
    import triton
    import triton.language as tl

    @triton.jit
    def moments(left, right, index, rows_right, keep, out, P, Q, R, C, s_le, s_lp, s_lr, s_re, s_rp, s_rc,
                s_ie, s_ip, s_we, s_wp, s_wc, s_ke, s_kp, tiles_n,
                BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr, UPCAST: tl.constexpr, ROWS: tl.constexpr,
                KEEP: tl.constexpr, IEEE: tl.constexpr):
        tile = tl.program_id(0)  # tiles on the grid's first axis: a vocabulary-sized head has more than 65,535
        e = tl.program_id(1).to(tl.int64)  # offsets in int64: a stack's, and one example's of a vocabulary-
        rows = ((tile // tiles_n) * BM + tl.arange(0, BM)).to(tl.int64)  # wide δ (T·V), can pass 2^31
        cols = ((tile % tiles_n) * BN + tl.arange(0, BN)).to(tl.int64)
        ks = tl.arange(0, BK).to(tl.int64)
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
    kernel, grid, args, options = moments_launch(left, right, index, rows_right, keep=keep, out=out)
    kernel[grid](*args, **options)
    return args[5]


def moments_launch(left: torch.Tensor, right: torch.Tensor, index: torch.Tensor | None = None,
                   rows_right: torch.Tensor | None = None, *, keep: torch.Tensor | None = None,
                   out: torch.Tensor | None = None, interpret: bool | None = None) -> tuple:
    """:func:`tile_moments`' launch, not run: (kernel, grid, arguments, options), ``arguments[5]`` the
    output. ``interpret`` None: as the device says (the interpreter on a CPU); False: the compiled kernel
    whatever the tensors' device (``fused_build`` compiles it for a GPU from CPU tensors)."""
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
    interpret = left.device.type == "cpu" if interpret is None else interpret
    ieee = left.dtype == torch.float32
    block_k = BLOCK_K // 2 if ieee else BLOCK_K  # float32 tiles in the shared memory of an A100 too
    args = (left, right, index, rows_right, keep, out, p, q, r, c, *left.stride(), *right.stride(), *index.stride(),
            *rows_right.stride(), *keep.stride(), -(-c // BLOCK_N))
    constants = dict(BM=BLOCK_M, BN=BLOCK_N, BK=block_k, UPCAST=interpret, ROWS=rows, KEEP=masked,
                     IEEE=ieee and not interpret)
    return _kernel(interpret), (n_tiles, e), args, constants | _options(interpret, NUM_WARPS, NUM_STAGES)


def _options(interpret: bool, warps: int, stages: int | None) -> dict:
    """A compiled kernel's launch options, fixed here rather than left to Triton's defaults: its warps and
    pipeline stages, and no contraction of a product and a sum into one fused multiply-add (Triton 3.9
    contracts by default and 3.10 will not; the interpreter, which the tests check, never does), so a
    kernel's numbers do not move with the Triton version."""
    if interpret:
        return {}
    return {"num_warps": warps, "enable_fp_fusion": False} | ({} if stages is None else {"num_stages": stages})


def reduce_tiles(out: torch.Tensor) -> torch.Tensor:
    """Tiles' numbers (…, tiles, 4) -> per example the sum and sum of squares (float64 across tiles),
    max and min, (…, 4) float64, in a fixed order; four ops, whatever the stack."""
    sums = out[..., :2].sum(-2, dtype=torch.float64)  # float32 tiles summed in float64 (no float64 copy)
    return torch.cat([sums, out[..., 2:3].amax(-2), out[..., 3:4].amin(-2)], dim=-1)  # (exact: float32 -> 64)


# -- vector parameters: a bias's or a norm weight's per-example gradient, its factors read in place ----------

VEC_ROWS, VEC_COLS = 32, 128  # positions and features of one program's tile (one tile shape: deterministic)
VEC_WARPS, VEC_STAGES = 4, None  # None: Triton's default pipelining
VEC_MODES = {"bias": 0, "ones": 0, "rms": 1, "rms32": 1, "layer": 2}
ROUNDING = {torch.float16: 1, torch.bfloat16: 2}  # x̂ rounded to x's dtype, as the module rounds it


@functools.cache
def _vector_kernel(interpret: bool):
    """The vector kernel, made once per mode (as :func:`_kernel`)."""
    import triton
    import triton.language as tl

    @triton.jit
    def vector_sums(delta, x, keep, out, P, N, s_db, s_dp, s_dn, s_xb, s_xp, s_xn, s_kb, s_kp, eps,
                    BP: tl.constexpr, BN: tl.constexpr, MODE: tl.constexpr, ROUND: tl.constexpr):
        """out[b, chunk, i] = Σ_{p in chunk, kept} δ[b, p, i] · ∂y/∂w[b, p, i] over one chunk of BP positions:
        MODE 0 a bias (∂y/∂w = 1), 1 an RMSNorm's x̂ = x / rms(x), 2 a LayerNorm's x̂ = (x - mean) / std;
        x̂ from float32 row statistics, rounded to x's dtype when ``ROUND`` (as the module rounds it)."""
        chunk = tl.program_id(0)
        b = tl.program_id(1).to(tl.int64)  # offsets in int64: a head's bias δ (T·V an example) can pass 2^31
        rows = (chunk * BP + tl.arange(0, BP)).to(tl.int64)
        cols = tl.arange(0, BN).to(tl.int64)
        real = (rows < P) & (tl.load(keep + b * s_kb + rows * s_kp, mask=rows < P, other=0) != 0)
        if MODE != 0:  # each row's statistics over all N features, in float32
            total = tl.zeros((BP,), dtype=tl.float32)
            for i0 in range(0, N, BN):
                xs = tl.load(x + b * s_xb + rows[:, None] * s_xp + (i0 + cols)[None, :] * s_xn,
                             mask=real[:, None] & ((i0 + cols) < N)[None, :], other=0.0).to(tl.float32)
                if MODE == 2:
                    total += tl.sum(xs, axis=1)
                else:
                    total += tl.sum(xs * xs, axis=1)
            mean = tl.zeros((BP,), dtype=tl.float32)
            if MODE == 2:  # the variance about the mean: a second read of the row
                mean = total / N
                total = tl.zeros((BP,), dtype=tl.float32)
                for i0 in range(0, N, BN):
                    xs = tl.load(x + b * s_xb + rows[:, None] * s_xp + (i0 + cols)[None, :] * s_xn,
                                 mask=real[:, None] & ((i0 + cols) < N)[None, :], other=0.0).to(tl.float32)
                    centred = tl.where(real[:, None] & ((i0 + cols) < N)[None, :], xs - mean[:, None], 0.0)
                    total += tl.sum(centred * centred, axis=1)
            scale = 1.0 / tl.sqrt(total / N + eps)
        for i0 in range(0, N, BN):
            inside = real[:, None] & ((i0 + cols) < N)[None, :]
            d = tl.load(delta + b * s_db + rows[:, None] * s_dp + (i0 + cols)[None, :] * s_dn,
                        mask=inside, other=0.0).to(tl.float32)
            if MODE != 0:
                xs = tl.load(x + b * s_xb + rows[:, None] * s_xp + (i0 + cols)[None, :] * s_xn,
                             mask=inside, other=0.0)
                hat = (xs.to(tl.float32) - mean[:, None]) * scale[:, None]
                if ROUND == 2:  # to bfloat16, to nearest even, by its bits: Triton 3.9's interpreter
                    bits = hat.to(tl.int32, bitcast=True)  # truncates a cast (the GPU does not)
                    bits = (bits + 0x7FFF + ((bits >> 16) & 1)) & -65536
                    hat = bits.to(tl.float32, bitcast=True)
                elif ROUND == 1:  # to float16
                    hat = hat.to(tl.float16).to(tl.float32)
                d = tl.where(inside, d * hat, 0.0)
            tl.store(out + (b * tl.num_programs(0) + chunk) * N + i0 + cols, tl.sum(d, axis=0), mask=(i0 + cols) < N)

    return vector_sums


def vector_mode(kind: str, hat, x: torch.Tensor | None) -> int | None:
    """The kernel's mode for a held vector use (``reduce.Held``: ``bias``, or ``norm`` with its
    ``NormHat``), or None where it does not apply: an ``rms`` norm computing in half precision (its
    arithmetic rounds as the kernel's float32 does not), a LayerNorm over more than the last axis."""
    if kind == "bias":
        return 0
    if kind != "norm" or hat is None or hat.kind not in VEC_MODES:
        return None
    if hat.kind == "rms" and x.dtype != torch.float32 or hat.kind == "layer" and len(hat.shape) != 1:
        return None
    return VEC_MODES[hat.kind]


_VECTOR_WORKS: dict[tuple, bool] = {}


def vector_usable(delta: torch.Tensor, x: torch.Tensor | None, mode: int) -> bool:
    """Whether the vector kernel takes δ like ``delta`` (and an input like ``x``) in ``mode``: where the
    tile kernel runs (:func:`usable`), and right on a small known problem on this device, once per
    device, dtypes and mode (else the formed path, said once in the log)."""
    if not usable(delta):
        return False
    key = (str(delta.device), delta.dtype, None if x is None else x.dtype, mode)
    if key not in _VECTOR_WORKS:
        _VECTOR_WORKS[key] = _vector_probe(delta.device, delta.dtype, None if x is None else x.dtype, mode)
    return _VECTOR_WORKS[key]


def _vector_probe(device: torch.device, dtype: torch.dtype, x_dtype: torch.dtype | None, mode: int) -> bool:
    """δ = 1 at 3 positions of 2 features; x = (2, 2) (an RMSNorm: x̂ = 1) or (1, 3) (a LayerNorm: x̂ =
    (-1, 1)), eps 0: the sums are (3, 3), or (-3, 3)."""
    delta = torch.ones((1, 3, 2), dtype=dtype, device=device)
    x = None if mode == 0 else torch.tensor([[2.0, 2.0]] * 3 if mode == 1 else [[1.0, 3.0]] * 3,
                                            dtype=x_dtype, device=device)[None]
    keep = torch.ones((1, 3), dtype=torch.bool, device=device)
    return _known("the vector kernel", device, dtype, lambda: vector_sums(delta, x, keep, mode).sum(1)[0].tolist(),
                  [-3.0, 3.0] if mode == 2 else [3.0, 3.0], " for biases and norms")


def vector_sums(delta: torch.Tensor, x: torch.Tensor | None, keep: torch.Tensor, mode: int, eps: float = 0.0,
                out: torch.Tensor | None = None) -> torch.Tensor:
    """δ (B, P, n) and, for a norm, its input x (B, P, n), keep (B, P) bool, as the pass left them (padding
    read as zeros whatever it holds) -> per chunk of ``VEC_ROWS`` positions Σ δ ⊙ ∂y/∂w, (B, chunks, n)
    float32, into ``out`` when given; ``.sum(1)`` is each example's gradient (:func:`vector_mode`'s modes)."""
    kernel, grid, args, options = vector_launch(delta, x, keep, mode, eps, out)
    kernel[grid](*args, **options)
    return args[3]


def vector_launch(delta: torch.Tensor, x: torch.Tensor | None, keep: torch.Tensor, mode: int, eps: float = 0.0,
                  out: torch.Tensor | None = None, interpret: bool | None = None) -> tuple:
    """:func:`vector_sums`' launch, not run: (kernel, grid, arguments, options), ``arguments[3]`` the output
    (``interpret`` as in :func:`moments_launch`)."""
    b, p, n = delta.shape
    chunks = -(-p // VEC_ROWS)
    if out is None:
        out = torch.empty((b, chunks, n), dtype=torch.float32, device=delta.device)
    assert out.shape == (b, chunks, n) and out.is_contiguous() and keep.shape == (b, p)
    xs = delta if x is None else x
    kb = keep.view(torch.uint8) if keep.dtype == torch.bool else keep
    interpret = delta.device.type == "cpu" if interpret is None else interpret
    args = (delta, xs, kb, out, p, n, *delta.stride(), *xs.stride(), *kb.stride(), float(eps))
    constants = dict(BP=VEC_ROWS, BN=VEC_COLS, MODE=mode, ROUND=ROUNDING.get(None if x is None else x.dtype, 0))
    return _vector_kernel(interpret), (chunks, b), args, constants | _options(interpret, VEC_WARPS, VEC_STAGES)
