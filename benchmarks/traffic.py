"""What one engine pass asks of a GPU at a real model's shapes, counted on a CPU in seconds: the device
ops it dispatches and the bytes they write, against a plain training step's forward and backward, by
where in the engine they come from.

The model is built on the CPU (so the engine can plan and check its rules on real numbers), then moved
to torch's ``meta`` device: every op still runs its shape logic, nothing is computed. The engine runs
as it does on a GPU: ``chunk_elements`` 2^28 (``auto`` on a GPU of 40 GiB or more), the GPU's
``hold_bytes``, and the half-precision sketch with float32 results (``factored.HALF_OUT``, which a
meta tensor takes as a GPU's). The pass ends before its copy to the host (``device_pass``).

FLOPs are those of the matrix products and attention (torch's flop counter's formulas; the fused
kernel's stand-in adds its tiles' products): the arithmetic floor of a pass, where the GPU's time cannot go
below FLOPs / the matmul rate. Ops counted are those that reach the device (``TorchDispatchMode``, below autograd: a view or an empty
allocation is not counted); on a GPU most are one kernel each. Bytes written are the sum of each op's
outputs: a proxy for memory traffic (reads are about as many). Both are proxies, not times: the
GPU's profile (``grad_stats.py`` profile section) says what the kernels take. Data-dependent checks in
transformers' forward are answered "true" on meta tensors (there is no data).

    python benchmarks/traffic.py --quick                  # Qwen2.5-0.5B's shapes, B = 16, T = 512, bf16
    python benchmarks/traffic.py --model qwen3-0.6b --batch 8 --length 1024
    python benchmarks/traffic.py --quick --fused          # with score.fused_moments

The last line printed is one JSON object with the headline figures.
"""

from __future__ import annotations

import argparse
import collections
import json
import sys
import time
import traceback
from pathlib import Path

import torch
from torch.utils._python_dispatch import TorchDispatchMode

sys.path.insert(0, str(Path(__file__).resolve().parent))
from grad_stats import MODELS, build_model, plain_step  # noqa: E402

NOT_OPS = {"reshape", "select", "transpose", "unsqueeze", "view", "slice", "alias", "flatten", "detach", "expand",
           "t", "permute", "squeeze", "as_strided", "unbind", "split", "split_with_sizes", "empty", "empty_strided",
           "empty_permuted", "_unsafe_view", "lift_fresh", "_reshape_alias", "view_as_real"}

PARTIAL = {"index_add_", "index_copy_", "index_put_", "scatter_add_", "scatter_", "index_add", "index_copy",
           "_index_put_impl_"}


ACTIVE: list[Count] = []  # the mode counting now (the fused kernel's stand-in adds its FLOPs to it)


class Count(TorchDispatchMode):
    """Ops that reach the device, the bytes of their outputs and the FLOPs of their matrix products
    (``torch.utils.flop_counter``'s formulas, and ``_grouped_mm``'s), by (engine site, op)."""

    def __init__(self):
        super().__init__()
        self.ops: collections.Counter = collections.Counter()
        self.bytes: collections.Counter = collections.Counter()
        self.flops: collections.Counter = collections.Counter()

    def __enter__(self):
        ACTIVE.append(self)
        return super().__enter__()

    def __exit__(self, *exc):
        ACTIVE.remove(self)
        return super().__exit__(*exc)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        name = func.overloadpacket.__name__
        if name not in NOT_OPS:
            key = (site(), name)
            self.ops[key] += 1
            self.flops[key] += flops_of(func, args, kwargs or {}, out)
            if name in PARTIAL:  # in place into part of its output: what it writes is its source's size
                written = [a for a in (*args, *(kwargs or {}).values()) if isinstance(a, torch.Tensor)][-1:]
            else:
                written = out if isinstance(out, (tuple, list)) else [out]
            for t in written:
                if isinstance(t, torch.Tensor):
                    self.bytes[key] += t.numel() * t.element_size()
        return out


def flops_of(func, args, kwargs, out) -> int:
    """FLOPs of one matrix product or attention op (0 for the others)."""
    from torch.utils.flop_counter import flop_registry

    packet = func.overloadpacket
    if packet in flop_registry:
        kwargs = {k: v for k, v in kwargs.items() if k not in ("out", "out_dtype")}  # (the result: out_val)
        if packet.__name__ in ("mm", "bmm"):
            args = args[:2]  # (an out_dtype overload's third argument)
        return int(flop_registry[packet](*args, **kwargs, out_val=out))
    if packet.__name__ == "_grouped_mm":  # (M, K) @ (G, K, N) by groups of rows: each row once, 2·M·K·N
        a, b = args[0], args[1]
        return 2 * a.shape[-2] * a.shape[-1] * b.shape[-1] * (1 if a.dim() == 2 else a.shape[0])
    return 0


def site() -> str:
    """The innermost ``grads_ray`` function on the stack (the model's own ops: the pass that runs it)."""
    for frame in reversed(traceback.extract_stack()[:-2]):
        if "grads_ray" in frame.filename:
            return f"{frame.filename.split('grads_ray/')[-1]}:{frame.name}"
    return "(model)"


def on_meta_data_checks() -> None:
    """A meta tensor has no value: transformers' checks of the mask (``.all()``, ``.item()``) read true."""
    real_bool, real_item = torch.Tensor.__bool__, torch.Tensor.item
    torch.Tensor.__bool__ = lambda self: True if self.device.type == "meta" else real_bool(self)
    torch.Tensor.item = lambda self: 1 if self.device.type == "meta" else real_item(self)


def stand_in_fused_kernel() -> None:
    """Meta stand-ins for ``gradients/fused.py``'s kernels: one op writing its one output, (E, tiles, 4)
    float32, or a vector's (B, chunks, n) (a Triton kernel cannot run on meta); the reductions after them
    run as they are."""
    from grads_ray.gradients import fused

    def tile_moments(left, right, index=None, rows_right=None, *, keep=None, out=None):
        if out is None:
            out = torch.empty((left.shape[0], fused.tiles(left.shape[-1], right.shape[-1]), 4), dtype=torch.float32,
                              device=left.device)
        e, p, r = left.shape
        work = 2 * e * p * r * right.shape[-1]  # the dense term's products, tile by tile
        if index is not None:  # and the one-hot rows': a (BM x BK) @ (BK x C) product per (row tile, chunk of
            q = index.shape[1]  # tokens) holding a hit, at most one per token (an upper bound: no data on meta)
            pairs = min(q, -(-q // fused.BLOCK_K) * -(-r // fused.BLOCK_M))
            work += 2 * e * pairs * fused.BLOCK_M * fused.BLOCK_K * right.shape[-1]
        out.zero_()  # counted as the kernel's launch and what it writes
        for mode in ACTIVE:
            mode.flops[(site(), "zero_")] += work
        return out

    def vector_sums(delta, x, keep, mode, eps=0.0, out=None):  # the vector kernel: its (B, chunks, n) partial sums
        if out is None:
            b, p, n = delta.shape
            out = torch.empty((b, -(-p // fused.VEC_ROWS), n), dtype=torch.float32, device=delta.device)
        return out.zero_()

    fused.usable = lambda x: x.dtype in (torch.float16, torch.bfloat16)
    fused.vector_usable = lambda delta, x, mode: fused.usable(delta)  # (its probe reads numbers: none on meta)
    fused.tile_moments = tile_moments
    fused.vector_sums = vector_sums


def count(fn) -> Count:
    mode = Count()
    with mode:
        fn()
    return mode


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="the defaults (a minute or two on a CPU)")
    ap.add_argument("--model", default="qwen0.5b", choices=sorted(MODELS))
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--length", type=int, default=512)
    ap.add_argument("--dtype", default="bfloat16")
    ap.add_argument("--top", type=int, default=15, help="engine sites and ops printed")
    ap.add_argument("--fused", action="store_true",
                    help="score.fused_moments: the Triton kernel counted as what it writes (per tile, 4 numbers)")
    args = ap.parse_args()

    from grads_ray.gradients import factored
    from grads_ray.gradients.engine import HOLD_BYTES, BatchedGradStats

    t0 = time.perf_counter()
    model = build_model(args.model, getattr(torch, args.dtype), "cpu")
    engine = BatchedGradStats(model, proj_dim=512, proj_rank=8, fisher_dim=64, fisher_rank=4,
                              hold_bytes=HOLD_BYTES["cuda"], chunk_elements=1 << 28, fused_moments=args.fused)
    if args.fused:
        stand_in_fused_kernel()
    model.to("meta")
    factored.HALF_OUT["meta"] = "native"  # the GPU's sketch of half-precision factors
    on_meta_data_checks()
    b, t = args.batch, args.length
    ids = torch.zeros((b, t), dtype=torch.long, device="meta")
    mask = torch.ones((b, t), dtype=torch.long, device="meta")
    batch = (ids, ids.clone(), mask)
    engine.device_pass(*batch, left_padded=False)  # once first: the engine's caches on the device
    eng = count(lambda: engine.device_pass(*batch, left_padded=False))
    plain = count(lambda: plain_step(model, *batch))
    seconds = time.perf_counter() - t0

    e_ops, p_ops = sum(eng.ops.values()), sum(plain.ops.values())
    e_gb, p_gb = sum(eng.bytes.values()) / 1e9, sum(plain.bytes.values()) / 1e9
    e_tf, p_tf = sum(eng.flops.values()) / 1e12, sum(plain.flops.values()) / 1e12
    print(f"# {args.model} {args.dtype} B={b} T={t}: engine {e_ops} device ops writing {e_gb:.1f} GB, {e_tf:.2f} "
          f"TFLOP of products; plain step {p_ops} writing {p_gb:.1f} GB, {p_tf:.2f} TFLOP: {e_ops / p_ops:.2f}x ops, "
          f"{e_gb / p_gb:.2f}x bytes, {e_tf / p_tf:.2f}x FLOPs ({seconds:.0f} s)")
    by_site: collections.Counter = collections.Counter()
    by_site_gb: collections.Counter = collections.Counter()
    by_site_tf: collections.Counter = collections.Counter()
    for (where, _), n in eng.ops.items():
        by_site[where] += n
    for (where, _), n in eng.bytes.items():
        by_site_gb[where] += n / 1e9
    for (where, _), n in eng.flops.items():
        by_site_tf[where] += n / 1e12
    print("# engine by site (ops, GB written, TFLOP); device_pass holds the model's own forward and backward:")
    for where, gb in by_site_gb.most_common(args.top):
        print(f"#   {by_site[where]:6d} {gb:8.2f} {by_site_tf[where]:7.3f}  {where}")
    print("# engine ops writing the most:")
    for (where, op), n in sorted(eng.bytes.items(), key=lambda kv: -kv[1])[:args.top]:
        print(f"#   {eng.ops[(where, op)]:6d} {n / 1e9:8.2f}  {op:26s} {where}")
    summary = {"model": args.model, "dtype": args.dtype, "batch": b, "length": t, "fused": args.fused,
               "engine_ops": e_ops, "plain_ops": p_ops, "ops_ratio": round(e_ops / p_ops, 3),
               "engine_gb_written": round(e_gb, 2), "plain_gb_written": round(p_gb, 2),
               "bytes_ratio": round(e_gb / p_gb, 3), "engine_tflop": round(e_tf, 3), "plain_tflop": round(p_tf, 3),
               "flops_ratio": round(e_tf / p_tf, 3)}
    print(json.dumps(summary))


if __name__ == "__main__":
    main()
