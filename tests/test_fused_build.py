"""The fused kernels built for the GPUs this project meets, on a CPU: Triton's compiler and ptxas take
every specialisation the engine launches, within each architecture's shared memory, with no register
spills on the corpus pass (``gradients/fused_build.py``). The interpreter tests (test_fused.py) check
the numbers; these check what the interpreter cannot: that a GPU compiles them, and what they take."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from grads_ray.gradients import fused, fused_build

ROOT = Path(__file__).resolve().parents[1]
needs_ptxas = pytest.mark.skipif(not fused_build.available(), reason="no Triton with its NVIDIA backend's ptxas")


def _build(*args: str) -> list[fused_build.Built]:
    env = {**os.environ, "TRITON_INTERPRET": "0", "PYTHONPATH": str(ROOT)}
    run = subprocess.run([sys.executable, "-m", "grads_ray.gradients.fused_build", *args], env=env, cwd=ROOT,
                         capture_output=True, text=True, timeout=1200)
    assert run.returncode == 0, run.stderr[-3000:]
    rows = [json.loads(line) for line in run.stdout.splitlines() if line.startswith("{")]
    return [fused_build.Built(**{**row, "narrow": tuple(row["narrow"])}) for row in rows]


@needs_ptxas
def test_every_specialisation_builds_for_the_gpus_within_their_limits():
    built = _build("--arch", "80,90")
    launches = len(list(fused_build.moments_launches())) + len(list(fused_build.vector_launches()))
    assert launches == 12 + 21  # 3 dtypes × rows × keep; 3 dtypes × (bias + 2 norms × 3 input dtypes)
    assert len(built) == 2 * launches and {b.arch for b in built} == {80, 90}
    assert all(b.registers is not None for b in built), "cuobjdump beside ptxas gave no resource usage"
    found = {f"sm_{b.arch} {b.kernel} {b.what}": problems for b in built if (problems := fused_build.problems(b))}
    assert not found, found
    moments = [b for b in built if b.kernel == "moments"]  # the pipeline's buffers: what the tiles ask
    assert all(b.shared >= 2 * (fused.BLOCK_M + fused.BLOCK_N) * fused.BLOCK_K for b in moments if "fp32" not in b.what)
    assert all(b.warps == fused.NUM_WARPS for b in moments)


def test_problems_name_what_a_gpu_would_not_take():
    fits = fused_build.Built("moments", 90, "bf16 keep", "bf16", 8, 98_304, 100, 0)
    assert fused_build.problems(fits) == []
    over = fused_build.Built("moments", 80, "bf16", "bf16", 8, 196_608, 255, 0)  # 256 × 256 × 64 tiles, 4 stages
    assert "over sm_80's" in fused_build.problems(over)[0]
    spills = fused_build.Built("vector", 90, "delta=bf16 x=bf16 mode=1", "bf16", 4, 1024, 255, 40)
    assert "spilled" in fused_build.problems(spills)[0]
    check_pass = fused_build.Built("moments", 80, "fp32 keep", "fp32", 8, 65_536, 255, 176)  # the self-check's float32
    assert fused_build.problems(check_pass) == []
    wraps = fused_build.Built("moments", 90, "bf16", "bf16", 8, 98_304, 98, 0, ("%a = arith.muli %e, %s_le : i32",))
    assert "32-bit product" in fused_build.problems(wraps)[0]


def test_narrow_products_are_those_of_two_run_time_values():
    """What the kernels' IR had with an example's program id left in int32 (found by taking the kernels'
    ``.to(tl.int64)`` out: 183 such products over the 33 builds), beside what stays legitimately 32-bit."""
    ttir = """
    %c128_i32 = arith.constant 128 : i32 loc(#loc1)
    %rows = arith.constant 32 : i32 loc(#loc92)
    %cst_3 = arith.constant dense<16> : tensor<32x128xi32> loc(#loc1)
    %t = arith.muli %tile, %c128_i32 : i32 loc(#loc108)
    %r = arith.muli %chunk, %rows : i32 loc(#loc92)
    %s = arith.muli %bits, %cst_3 : tensor<32x128xi32> loc(#loc3)
    %a_43 = arith.muli %e, %s_le : i32 loc(#loc9)
    %w = arith.muli %k, %s_lp : tensor<1x64xi32> loc(#loc10)
    %ok = arith.muli %e_4, %s_le64 : i64 loc(#loc122)
    """
    assert fused_build.narrow_products(ttir) == ["%a_43 = arith.muli %e, %s_le : i32",
                                                 "%w = arith.muli %k, %s_lp : tensor<1x64xi32>"]


def test_a_build_refuses_an_interpreting_process(monkeypatch):
    pytest.importorskip("triton")
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    launch = next(iter(fused_build.moments_launches()))[1]
    with pytest.raises(RuntimeError, match="not interpreting"):
        fused_build.build(launch, 90)


def test_the_launch_is_the_one_the_engine_runs():
    """tile_moments and vector_sums launch what the builders return: same grid, arguments and options."""
    left = torch.randn((2, 5, 3), dtype=torch.float32)
    kernel, grid, args, options = fused.moments_launch(left, left, interpret=False)
    assert grid == (fused.tiles(3, 3), 2) and args[0] is left and args[5].shape == (2, grid[0], 4)
    assert options["num_warps"] == fused.NUM_WARPS and options["enable_fp_fusion"] is False and options["IEEE"]
    kernel, grid, args, options = fused.vector_launch(left, None, torch.ones((2, 5), dtype=torch.bool), 0)
    assert grid == (1, 2) and options == {"BP": fused.VEC_ROWS, "BN": fused.VEC_COLS, "MODE": 0, "ROUND": 0}
