"""The fused kernels built for a GPU on a machine without one: Triton's own compiler and ptxas, no device.

The tests run the kernels in Triton's interpreter (numpy), which checks their numbers but not whether the
GPU compiler takes them, nor what they cost a GPU: the interpreter has no registers, no shared memory and
no 32-bit overflow. Here each specialisation the engine launches (``fused.moments_launch``,
``fused.vector_launch``: the same arguments and options as a real launch, from CPU tensors) is compiled to
a cubin for a named architecture, with Triton's JIT specialising the arguments as on a GPU, and read back:
registers a thread, bytes spilled to local memory, shared memory a program. ``tests/test_fused_build.py``
builds every specialisation for the GPUs this project meets; the command below prints them.

The device is stood in for by a driver that only names the target: compiling needs nothing else, and a
launch (which would need one) is never made. The kernels' compile caches are keyed by that stand-in, so
a real GPU's stay apart. Triton's interpreter must be off in the process (it decides, when triton is
imported, what Triton's own library functions are): the tests, which interpret, build in a child
process, ``python -m grads_ray.gradients.fused_build --arch 80,90`` (one JSON line a specialisation).
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import itertools
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile

import torch

from grads_ray.gradients import fused

# The GPUs the project meets, by compute capability; shared memory a block may take (CUDA's per-arch limits)
ARCHS = {80: "A100", 89: "L4/L40S", 90: "H100/H200", 100: "B200"}
SHARED_LIMIT = {75: 64 * 1024, 80: 163 * 1024, 86: 99 * 1024, 89: 99 * 1024, 90: 227 * 1024, 100: 227 * 1024}
DTYPES = (torch.bfloat16, torch.float16, torch.float32)


@dataclasses.dataclass(frozen=True)
class Built:
    """One specialisation compiled for one architecture and what it takes (None: the tool to read it is missing)."""

    kernel: str  # moments | vector
    arch: int
    what: str  # the specialisation, e.g. "bf16 rows keep" or "delta=bf16 x=fp32 mode=1"
    dtype: str  # the factors' (the tile kernel) or δ's (the vector kernel): bf16 | fp16 | fp32
    warps: int
    shared: int  # bytes of shared memory a program (Triton's figure: what a launch asks for)
    registers: int | None  # a thread
    spilled: int | None  # bytes of stack a thread (register spills and local arrays: slow local memory)
    narrow: tuple[str, ...] = ()  # products of two run-time values in 32 bits (``narrow_products``)


def available() -> bool:
    """Whether this machine can build for a GPU: Triton with its NVIDIA backend and its ptxas."""
    try:
        from triton import knobs

        return os.path.isfile(knobs.nvidia.ptxas.path)  # knobs resolves the tool beside Triton's NVIDIA backend
    except Exception:  # noqa: BLE001 - no triton, no NVIDIA backend, no ptxas: nothing to build with
        return False


class _Target:
    """Triton's driver, standing in for a device of compute capability ``arch``: the target and nothing else."""

    def __init__(self, arch: int):
        from triton.backends.compiler import GPUTarget

        self.target = GPUTarget("cuda", arch, 32)
        self.arch = arch

    def get_current_target(self):
        return self.target

    def get_current_device(self):
        return f"build:sm_{self.arch}"  # the kernels' compile caches are per device: these stay apart

    def get_current_stream(self, device=None):
        return 0


@contextlib.contextmanager
def _standing_in(arch: int):
    from triton import knobs
    from triton.runtime import driver

    if knobs.runtime.interpret:  # Triton's own library (tl.sum, tl.max...) was then defined for the interpreter
        raise RuntimeError("the fused kernels are built for a GPU in a process whose Triton is not interpreting: "
                           "TRITON_INTERPRET unset or 0 before triton is imported (python -m "
                           "grads_ray.gradients.fused_build runs one)")
    before = getattr(driver, "_active", None)
    driver.set_active(_Target(arch))
    try:
        yield
    finally:
        driver._active = before  # not reset_active(): on a machine without a GPU the default driver cannot be made


def build(launch: tuple, arch: int):
    """A launch from ``fused.*_launch(..., interpret=False)`` compiled for sm_``arch`` -> Triton's compiled
    kernel (``.metadata``, ``.asm["cubin"]``), without running it."""
    kernel, grid, args, options = launch
    with _standing_in(arch):
        return kernel.warmup(*args, grid=grid, **options)


def resources(cubin: bytes) -> tuple[int | None, int | None]:
    """A cubin's (registers, stack bytes) a thread, read by the cuobjdump beside Triton's ptxas (None, None
    where there is none)."""
    try:
        from triton import knobs

        tool = knobs.nvidia.cuobjdump.path
    except Exception:  # noqa: BLE001 - no cuobjdump: the compile itself is still checked
        tool = shutil.which("cuobjdump")
    if tool is None:
        return None, None
    with tempfile.TemporaryDirectory() as folder:
        path = os.path.join(folder, "kernel.cubin")
        with open(path, "wb") as f:
            f.write(cubin)
        out = subprocess.run([tool, "--dump-resource-usage", path], capture_output=True, text=True, check=False).stdout
    found = re.search(r"REG:(\d+) STACK:(\d+)", out)
    return (int(found[1]), int(found[2])) if found else (None, None)


_CONSTANT = re.compile(r"(%[\w.]+) = arith\.constant\b")
_PRODUCT = re.compile(r"(%[\w.]+) = arith\.muli (%[\w.]+), (%[\w.]+) : (?:tensor<[^>]*xi32>|i32\b)")


def narrow_products(ttir: str) -> list[str]:
    """The 32-bit integer products of two run-time values in a kernel's Triton IR (``arith.muli`` on i32,
    neither side a constant). An offset so formed wraps past 2^31 elements, which one example's
    vocabulary-wide δ (T·V) passes at T ≥ 14,135 for Qwen's vocabulary, and a wrapped offset reads another
    example's numbers without an error: the kernels take their program ids and indices to int64 first,
    so the only 32-bit products left are a program id by a tile size. No test can reach such a size; this
    reads the arithmetic instead."""
    constants = set(_CONSTANT.findall(ttir))
    return [m[0].strip() for m in _PRODUCT.finditer(ttir) if m[2] not in constants and m[3] not in constants]


def _name(dtype: torch.dtype | None) -> str:
    return {torch.bfloat16: "bf16", torch.float16: "fp16", torch.float32: "fp32", None: "none"}[dtype]


def moments_launches(positions: int = 61, size: int = 128):
    """Every specialisation of the tile kernel the engine launches: factors' dtype × sparse rows (a tied
    head) × a keep mask, on CPU tensors of (2, ``positions``, ``size``) (odd positions: no divisibility
    of P to specialise on) -> (name, launch) pairs."""
    for dtype, rows, keep in itertools.product(DTYPES, (False, True), (False, True)):
        left = torch.zeros((2, positions, size), dtype=dtype)
        index = torch.zeros((2, 8), dtype=torch.long) if rows else None
        rows_right = torch.zeros((2, 8, size), dtype=dtype) if rows else None
        mask = torch.ones((2, positions), dtype=torch.bool) if keep else None
        launch = fused.moments_launch(left, left, index, rows_right, keep=mask, interpret=False)
        yield " ".join([_name(dtype), *(["rows"] if rows else []), *(["keep"] if keep else [])]), launch


def vector_launches(positions: int = 61, size: int = 896):
    """Every specialisation of the vector kernel the engine launches: δ's dtype × mode (bias, RMSNorm,
    LayerNorm) × the norm's input dtype (which sets the rounding of x̂) -> (name, launch) pairs."""
    for dtype, mode in itertools.product(DTYPES, (0, 1, 2)):
        for x_dtype in (None,) if mode == 0 else DTYPES:
            delta = torch.zeros((2, positions, size), dtype=dtype)
            x = None if x_dtype is None else torch.zeros((2, positions, size), dtype=x_dtype)
            keep = torch.ones((2, positions), dtype=torch.bool)
            yield (f"delta={_name(dtype)} x={_name(x_dtype)} mode={mode}",
                   fused.vector_launch(delta, x, keep, mode, 1e-6, interpret=False))


def problems(built: Built) -> list[str]:
    """What would cost a GPU dearly in one build: an offset's product in 32 bits (wrong numbers at large
    sizes, :func:`narrow_products`), more shared memory than a block of its architecture may take (the
    launch fails; the engine's probe then keeps the formed path), or registers spilled to local memory in
    a half-precision specialisation (the corpus pass; float32 is the self-check's few rows)."""
    found = [f"32-bit product of run-time values: {line}" for line in built.narrow]
    limit = SHARED_LIMIT.get(built.arch)
    if limit is not None and built.shared > limit:
        found.append(f"{built.shared:,} bytes of shared memory, over sm_{built.arch}'s {limit:,}")
    if built.dtype != "fp32" and built.spilled:
        found.append(f"{built.spilled} bytes a thread spilled to local memory ({built.registers} registers)")
    return found


def build_all(arch: int, kernels: tuple[str, ...] = ("moments", "vector")) -> list[Built]:
    """Each specialisation of ``kernels`` built for sm_``arch`` (a kernel the compiler refuses raises)."""
    out = []
    for kernel, launches in (("moments", moments_launches), ("vector", vector_launches)):
        if kernel not in kernels:
            continue
        for what, launch in launches():
            compiled = build(launch, arch)
            registers, spilled = resources(compiled.asm["cubin"])
            dtype = _name(launch[2][0].dtype)  # the first argument: the left factor, or δ
            out.append(Built(kernel, arch, what, dtype, compiled.metadata.num_warps, compiled.metadata.shared,
                             registers, spilled, tuple(narrow_products(compiled.asm["ttir"]))))
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m grads_ray.gradients.fused_build", description=__doc__.split("\n")[0])
    parser.add_argument("--arch", default=",".join(map(str, ARCHS)), help="compute capabilities, e.g. 80,90")
    parser.add_argument("--kernels", default="moments,vector")
    parser.add_argument("--tiles", default="", help="the tile kernel's BLOCK_M,BLOCK_N,BLOCK_K,warps,stages "
                        f"(default {fused.BLOCK_M},{fused.BLOCK_N},{fused.BLOCK_K},{fused.NUM_WARPS},{fused.NUM_STAGES})")
    args = parser.parse_args(argv)
    if args.tiles:
        fused.set_tiles(*map(int, args.tiles.split(",")))
    if not available():
        print("no ptxas beside Triton's NVIDIA backend: nothing to build with", file=sys.stderr)
        return 2
    for arch in map(int, args.arch.split(",")):
        for built in build_all(arch, tuple(args.kernels.split(","))):
            print(json.dumps(dataclasses.asdict(built)), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
