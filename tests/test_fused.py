"""The fused moments kernel (``gradients/fused.py``, a GPU's) run in Triton's interpreter on the CPU:
each example's sum of squares, max and min of G_e = L_eᵀ R_e against float64, on shapes that are not
multiples of its tiles, with padding; and the engine with ``fused_moments`` on against the float64
reference and against the formed path."""

from __future__ import annotations

import copy
import logging
import os

import numpy as np
import pytest
import torch

from grads_ray.gradients import fused

pytest.importorskip("triton")


@pytest.fixture
def interpret():
    if os.environ.get("TRITON_INTERPRET") != "1":  # conftest sets it where there is no GPU
        pytest.skip("Triton's interpreter is off (a GPU is here): tests/test_grad_engine.py runs the engine there")


def _factors(seed: int, e: int, p: int, r: int, c: int, dtype, sign: float = 1.0):
    g = torch.Generator().manual_seed(seed)
    left = torch.randn((e, p, r), generator=g).to(dtype)
    right = torch.randn((e, p, c), generator=g).to(dtype)
    if sign < 0:  # every entry of every G_e negative: a max taken over padded tiles would read 0
        left, right = left.abs(), -right.abs()
    real = torch.randint(1, p + 1, (e,), generator=g)
    keep = torch.arange(p)[None, :] < real[:, None]  # (E, P): each example's real positions
    return torch.where(keep[..., None], left, 0), torch.where(keep[..., None], right, 0)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
@pytest.mark.parametrize("shape, sign", [((5, 37, 150, 70), 1.0), ((3, 64, 128, 256), 1.0), ((4, 9, 33, 130), -1.0)])
def test_fused_moments_against_float64(dtype, shape, sign, interpret):
    left, right = _factors(sum(shape), *shape, dtype, sign)
    assert fused.usable(left)
    s, ss, mx, mn = fused.block_moments(left, right)
    g = torch.einsum("epr,epc->erc", left.double(), right.double()).flatten(1)
    assert ss.dtype == mx.dtype == torch.float64 and ss.shape == (shape[0],)
    torch.testing.assert_close(ss, g.square().sum(1), rtol=1e-5, atol=0)
    assert ((s - g.sum(1)).abs() <= 1e-5 * g.abs().sum(1)).all()
    scale = g.abs().amax(1)
    assert ((mx - g.amax(1)).abs() <= 1e-5 * scale).all() and ((mn - g.amin(1)).abs() <= 1e-5 * scale).all()
    if sign < 0:
        assert (mx < 0).all()


@pytest.mark.parametrize("dtype,q", [(torch.bfloat16, 17), (torch.float16, 17), (torch.bfloat16, 150)])
def test_fused_moments_with_tied_rows(dtype, q, interpret):
    """A head tied to its embedding: dense rows plus one-hot rows e_index ⊗ rows_right (index -1: none;
    repeated indices add up), built in the kernel's registers, against float64. At q = 150 (three chunks
    of tokens, three row tiles) some (tile, chunk) pairs hold no hit and are skipped, others do not."""
    e, p, r, c = 3, 21, 300, 40
    left, right = _factors(11, e, p, r, c, dtype)
    g = torch.Generator().manual_seed(12)
    index = torch.randint(-1, r, (e, q), generator=g)
    index[:, :3] = 5  # one row hit three times
    if q > 64:
        index[:, 64:128] = torch.randint(0, 128, (e, 64), generator=g)  # the second chunk: the first tile only
        index[1, 128:] = -1  # the third chunk of example 1: no row at all
        index[2, 140] = 299  # the last row of the last (partial) tile
        index[0, 128:] = -1  # the third chunk of example 0: only the rows either side of a tile's edge
        index[0, 130], index[0, 131] = 128, 127
    rows_right = torch.randn((e, q, c), generator=g).to(dtype)
    s, ss, mx, mn = fused.block_moments(left, right, index, rows_right)
    want = torch.einsum("epr,epc->erc", left.double(), right.double())
    hot = torch.nn.functional.one_hot(index.clamp(min=0), r).double() * (index >= 0)[..., None]  # (E, Q, R)
    want = (want + torch.einsum("eqr,eqc->erc", hot, rows_right.double())).flatten(1)
    torch.testing.assert_close(ss, want.square().sum(1), rtol=1e-5, atol=0)
    assert ((s - want.sum(1)).abs() <= 1e-5 * want.abs().sum(1)).all()
    scale = want.abs().amax(1)
    assert ((mx - want.amax(1)).abs() <= 1e-5 * scale).all() and ((mn - want.amin(1)).abs() <= 1e-5 * scale).all()
    plain = fused.block_moments(left, right)[1]
    assert not torch.allclose(plain, ss, rtol=1e-3)  # the rows count


def test_fused_is_not_used_where_it_cannot_run(monkeypatch):
    """Without the interpreter a CPU tensor is not the kernel's; float64 never is."""
    assert not fused.usable(torch.zeros((1, 2, 2), dtype=torch.float64))
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    assert not fused.usable(torch.zeros((1, 2, 2), dtype=torch.bfloat16))


@pytest.mark.parametrize("tied", [False, True])
def test_engine_with_fused_moments(tmp_path, interpret, monkeypatch, tied):
    """bfloat16 Llama (its head tied to its embedding too), padded batch: the stacks (and the tied
    head with its embedding rows) go through the kernel; the numbers stay within the bfloat16 model's
    own error of the float64 reference, and within bfloat16's rounding of the formed path (which
    rounds every entry of G to bfloat16 before its square, max and min)."""
    from transformers import AutoModelForCausalLM

    from grads_ray.gradients import grouped
    from grads_ray.gradients.engine import BatchedGradStats
    from tests.conftest import VOCAB, tiny_config
    from tests.reference import pad, random_examples, reference, scale_of

    calls = []  # whether each call had embedding rows
    real = fused.tile_moments
    monkeypatch.setattr(fused, "tile_moments", lambda *a, **k: calls.append(len(a) > 2 and a[2] is not None)
                        or real(*a, **k))
    stacks = []  # the stacked copies made (the fused path reads each member in place, vectors too)
    real_stacked = grouped.stacked
    monkeypatch.setattr(grouped, "stacked", lambda parts, keep: stacks.append(parts[0].shape) or real_stacked(parts, keep))
    cfg = tiny_config("llama")
    cfg.tie_word_embeddings = tied
    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(cfg).save_pretrained(tmp_path / "m")
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "m").eval()
    model64 = copy.deepcopy(model).double()
    bf16 = copy.deepcopy(model).to(torch.bfloat16)
    examples = random_examples(5, seed=7, vocab=VOCAB)
    batch = pad(examples, "right")
    on = BatchedGradStats(bf16, proj_dim=16, proj_rank=4, fisher_dim=0, fused_moments=True)(*batch, left_padded=False)
    assert calls, "no stack went through the fused kernel"
    assert any(calls) == tied  # the tied head's embedding rows went in with it
    n_calls = len(calls)
    assert not stacks  # no stacked copy at all: the matrices and the norms read in place
    off = BatchedGradStats(bf16, proj_dim=16, proj_rank=4, fisher_dim=0)(*batch, left_padded=False)
    assert len(calls) == n_calls and stacks  # the formed path stacks the factors
    for i, (x, y) in enumerate(examples):
        ref = reference(model64, x, y)
        for key, tol in (("grad_norm", 0.01), ("grad_std", 0.01), ("layer0.mlp.grad_norm", 0.01),
                         ("grad_max", 0.05), ("grad_min", 0.05), ("layer1.attn.grad_max", 0.05)):
            assert abs(on.columns[key][i] - ref[key]) <= tol * scale_of(ref, key), (key, i)
    for key in on.columns:
        a, b = np.asarray(on.columns[key]), np.asarray(off.columns[key])
        assert np.allclose(a, b, rtol=2e-2, atol=1e-6, equal_nan=True), key
    assert not np.array_equal(np.asarray(on.columns["grad_max"]), np.asarray(off.columns["grad_max"]))


@pytest.mark.parametrize("kind,dtype", [("bias", torch.bfloat16), ("ones", torch.float32), ("rms32", torch.bfloat16),
                                        ("rms32", torch.float16), ("rms32", torch.float32), ("rms", torch.float32),
                                        ("layer", torch.bfloat16), ("layer", torch.float16), ("layer", torch.float32)])
def test_vector_kernel_against_float64(kind, dtype, interpret):
    """A bias's or a norm weight's per-example gradient Σ_p δ ⊙ x̂ from the vector kernel, δ and x as a
    pass leaves them (views with strides, NaN at padding, positions and features that are not
    multiples of a tile), against float64 sums of the module's own x̂ (``NormHat``, rounded to x's dtype
    as the module rounds it)."""
    from grads_ray.gradients.rules import NormHat

    b, p, n = 3, 45, 200  # 2 chunks of 32 positions, 2 tiles of 128 features
    g = torch.Generator().manual_seed(5)
    delta = torch.randn((b, p, n + 7), generator=g).to(dtype)[..., 3:n + 3]  # a strided view
    x = (torch.randn((b, p, n), generator=g) * 3 + 0.5).to(dtype)
    keep = torch.rand((b, p), generator=g) > 0.3
    hat = None if kind == "bias" else NormHat(kind, 1e-5, (n,) if kind == "layer" else ())
    want_hat = torch.ones_like(x) if kind in ("bias", "ones") else hat(None, None, x)
    want = (delta.double() * want_hat.double() * keep[..., None]).sum(1)
    mode = fused.vector_mode("bias" if kind == "bias" else "norm", hat, x)
    d, xs = delta.clone(), x.clone()
    d[~keep], xs[~keep] = float("nan"), float("nan")
    got = fused.vector_sums(d, None if mode == 0 else xs, keep, mode, 1e-5)
    assert got.shape == (b, 2, n) and got.dtype == torch.float32
    def err(w):
        return ((got.sum(1).double() - w).abs().max() / w.abs().max()).item()

    if dtype == torch.float32 or kind in ("bias", "ones"):
        assert err(want) < 1e-6, err(want)  # float32 sums of exact products
    else:  # x̂ rounded to x's dtype: where the kernel's float32 row statistics and torch's differ in their last
        # bit an entry may round the other way (one ulp of it), so within a few ulps; and far closer than
        # the same sums of x̂ left unrounded (the rounding is done, to nearest, as the module does it)
        ulp = {torch.bfloat16: 2**-8, torch.float16: 2**-11}[dtype]
        loose = (delta.double() * hat(None, None, x.float()).double() * keep[..., None]).sum(1)
        assert err(want) < ulp / 2 and err(want) < err(loose) / 4, (err(want), err(loose))


def test_vector_kernel_writes_its_slot_only(interpret):
    """``out=``: one member's slot of a stack's buffer, the others untouched (``Reducer._vectors_in_place``)."""
    g = torch.Generator().manual_seed(9)
    delta, x = torch.randn((2, 40, 130), generator=g), torch.randn((2, 40, 130), generator=g)
    keep = torch.rand((2, 40), generator=g) > 0.2
    alone = fused.vector_sums(delta, x, keep, 1, 1e-6)
    stack = torch.full((3, 2, 2, 130), 7.0)
    fused.vector_sums(delta, x, keep, 1, 1e-6, out=stack[1])
    assert torch.equal(stack[1], alone) and (stack[0] == 7).all() and (stack[2] == 7).all()


def test_vector_kernel_is_probed_once_and_a_failing_one_is_not_used(interpret, monkeypatch, caplog):
    """Per device, dtypes and mode: the kernel on a known problem; one that raises or is wrong there
    leaves the formed path, said once."""
    monkeypatch.setattr(fused, "_VECTOR_WORKS", {})
    delta, x = torch.zeros((1, 2, 2), dtype=torch.bfloat16), torch.zeros((1, 2, 2), dtype=torch.bfloat16)
    assert all(fused.vector_usable(delta, None if m == 0 else x, m) for m in (0, 1, 2))
    assert len(fused._VECTOR_WORKS) == 3
    real = fused.vector_sums
    monkeypatch.setattr(fused, "_VECTOR_WORKS", {})
    monkeypatch.setattr(fused, "vector_sums", lambda *a, **k: real(*a, **k) * 1.01)  # 1% off
    with caplog.at_level(logging.WARNING, logger="grads_ray"):
        assert not fused.vector_usable(delta, x, 1) and not fused.vector_usable(delta, x, 1)
    assert caplog.text.count("the vector kernel gave") == 1
    monkeypatch.setattr(fused, "vector_sums", lambda *a, **k: (_ for _ in ()).throw(RuntimeError("no shared memory")))
    assert not fused.vector_usable(delta, None, 0) and "does not run" in caplog.text


def test_vector_kernel_modes():
    from grads_ray.gradients.rules import NormHat

    x32, x16 = torch.zeros(1), torch.zeros(1, dtype=torch.bfloat16)
    assert fused.vector_mode("bias", None, None) == 0 and fused.vector_mode("norm", NormHat("ones"), x16) == 0
    assert fused.vector_mode("norm", NormHat("rms32", 1e-6), x16) == 1 == fused.vector_mode("norm", NormHat("rms"), x32)
    assert fused.vector_mode("norm", NormHat("rms", 1e-6), x16) is None  # its arithmetic in bfloat16
    assert fused.vector_mode("norm", NormHat("layer", 1e-5, (4,)), x16) == 2
    assert fused.vector_mode("norm", NormHat("layer", 1e-5, (2, 4)), x16) is None
    assert fused.vector_mode("norm", None, x16) is None and fused.vector_mode("vector", None, None) is None


def test_mixture_of_experts_blocks_through_the_kernel(tmp_path, interpret, monkeypatch):
    """Qwen3-MoE in bfloat16: the experts' (expert, example) blocks go through the kernel too; the
    statistics stay within bfloat16's rounding of the formed path's, every column."""
    import traceback

    from grads_ray.gradients.engine import BatchedGradStats
    from tests.families import build_family
    from tests.reference import pad, random_examples

    calls = []  # whether each call reduced an experts weight
    real = fused.tile_moments
    monkeypatch.setattr(fused, "tile_moments", lambda *a, **k: calls.append(
        any(f.name == "_reduce_experts" for f in traceback.extract_stack())) or real(*a, **k))
    model = build_family("qwen3_moe", tmp_path / "moe").to(torch.bfloat16)
    batch = pad(random_examples(4, seed=3, vocab=model.config.vocab_size), "right")
    on = BatchedGradStats(model, proj_dim=16, proj_rank=4, fisher_dim=0, fused_moments=True)(*batch, left_padded=False)
    assert any(calls) and not all(calls)  # the experts' blocks and the stacks
    n_calls = len(calls)
    off = BatchedGradStats(model, proj_dim=16, proj_rank=4, fisher_dim=0)(*batch, left_padded=False)
    assert len(calls) == n_calls
    for key in on.columns:
        a, b = np.asarray(on.columns[key]), np.asarray(off.columns[key])
        assert np.allclose(a, b, rtol=2e-2, atol=1e-6, equal_nan=True), key


@pytest.mark.parametrize("half_sketch", [False, True])
def test_members_in_place_equal_the_stack(interpret, monkeypatch, half_sketch):
    """The fused path reads each member's factors where the pass left them, padding unmasked (NaN
    there here): the same moments and sketch as the stacked, masked factors through the formed path."""
    from grads_ray.gradients import factored, grouped

    if half_sketch:
        monkeypatch.setitem(factored.HALF_OUT, "cpu", "emulate")
    g = torch.Generator().manual_seed(4)
    n, b, p, r, c = 3, 4, 11, 24, 40
    keep = torch.rand((b, p), generator=g) > 0.3
    keep[:, 0] = True
    lefts = [torch.randn((b, p, r), generator=g).to(torch.bfloat16) for _ in range(n)]
    rights = [torch.randn((b, p, c), generator=g).to(torch.bfloat16) for _ in range(n)]
    for x in lefts + rights:
        x[~keep] = torch.nan  # whatever padding holds never reaches a number
    p_rows, p_cols = torch.randn((n, 4, r), generator=g), torch.randn((n, 3, c), generator=g)
    split = tuple(factored.split_half(m.transpose(1, 2), torch.bfloat16) for m in (p_rows, p_cols))
    got = grouped.unstacked_moments(lefts, rights, keep)
    sketch = grouped.unstacked_project(lefts, rights, keep, p_rows, p_cols, split)
    left, right = grouped.stacked(lefts, keep), grouped.stacked(rights, keep)
    want = grouped.dense_moments(left, right, extrema=True, chunk_elements=1 << 20)
    want_sketch = grouped.dense_project(left, right, p_rows, p_cols, split)
    assert got.isfinite().all() and sketch.isfinite().all()
    torch.testing.assert_close(got[:, 0], want[:, 0], rtol=1e-4, atol=1e-4)  # entry sums: another order
    torch.testing.assert_close(got[:, 1], want[:, 1], rtol=1e-2, atol=0)  # squares: G rounded to bf16 in `want`
    torch.testing.assert_close(got[:, 2:], want[:, 2:], rtol=1e-2, atol=1e-2)
    torch.testing.assert_close(sketch, want_sketch, rtol=1e-4, atol=1e-4)


def test_a_kernel_that_fails_its_probe_leaves_the_formed_path(interpret, monkeypatch, caplog):
    """A device where the kernel does not compile or run (no bf16 tensor cores, too little shared memory)
    or gives a wrong number is found once, said in the log, and the formed path is used."""
    monkeypatch.setattr(fused, "_WORKS", {})
    x = torch.zeros((1, 2, 2), dtype=torch.float16)

    def broken(*args, **kwargs):
        raise RuntimeError("out of resources: shared memory, Required: 98304, Hardware limit: 65536")

    monkeypatch.setattr(fused, "tile_moments", broken)
    with caplog.at_level("WARNING", logger="grads_ray"):
        assert not fused.usable(x) and not fused.usable(x)
    assert caplog.text.count("out of resources") == 1
    monkeypatch.setattr(fused, "_WORKS", {})
    monkeypatch.setattr(fused, "tile_moments", lambda *a, **k: torch.zeros((1, 1, 4)))
    assert not fused.usable(x)
    monkeypatch.undo()
    assert fused.usable(x)


def test_a_gpu_before_ampere_keeps_the_formed_path(monkeypatch, caplog):
    """A T4 (compute capability 7.5): the kernels compile for it but spill 7 KB a thread (fused_build), and it
    has no bfloat16 tensor cores; refused before any tensor is made on it, said once."""
    pytest.importorskip("triton")
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (7, 5))
    with caplog.at_level("WARNING", logger="grads_ray"):
        assert not fused._probe(torch.device("cuda", 0), torch.float16)
    assert "compute capability 7.5" in caplog.text and "formed path" in caplog.text


def test_a_kernel_off_by_one_percent_is_caught_by_the_self_check(tmp_path, interpret, monkeypatch):
    """A bfloat16 model's self-check runs its float32 pass through the kernel too (IEEE float32
    products): a kernel whose sums of squares are 2% off (norms 1%), which bfloat16's tolerance would
    let through, is caught there, and ``score.engine=auto`` scores one example at a time."""
    from grads_ray.gradients.selfcheck import build_engine, synthetic_examples
    from grads_ray.gradients.stats import LoopGradStats
    from tests.conftest import VOCAB, save_tiny_model

    real = fused.tile_moments

    def off(*args, **kwargs):
        out = real(*args, **kwargs)
        out[..., 1] *= 1.02
        return out

    monkeypatch.setattr(fused, "tile_moments", off)
    # past the start-up probe, which would find this kernel wrong on its own small problem
    monkeypatch.setattr(fused, "_WORKS", {("cpu", torch.bfloat16): True, ("cpu", torch.float32): True})
    model = save_tiny_model("qwen2", tmp_path / "qwen2").eval().to(torch.bfloat16)
    settings = {"engine": "auto", "proj_dim": 0, "fisher_dim": 0, "fused_moments": True}
    engine, result = build_engine(model, settings, synthetic_examples(VOCAB, n=3, seed=1), pad_id=0)
    assert isinstance(engine, LoopGradStats) and not result.passed
    assert result.float32 is not None and not result.float32["passed"], result
    monkeypatch.setattr(fused, "tile_moments", real)
    engine, result = build_engine(model, settings, synthetic_examples(VOCAB, n=3, seed=1), pad_id=0)
    assert result.passed and result.float32["passed"], result.reason
