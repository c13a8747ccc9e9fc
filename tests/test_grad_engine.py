"""The batched engine against the plain reference (float64, one unpadded example at a time, whole
gradients from autograd): every statistic overall and per group, the projected gradient, the hidden
features, for Llama, Qwen2 and GPT-2, left and right padding, masked prompts, odd lengths, batch > 1.
Relative error < 1e-5 with a float64 model, < 1e-3 with a float32 one."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch

from grads_ray.gradients import factored
from grads_ray.gradients.engine import BatchedGradStats, UnsupportedModel
from grads_ray.gradients.projection import Projector
from tests.conftest import VOCAB, save_tiny_model, tiny_config
from tests.reference import check_against_reference, pad, random_examples

ARCHS = ["llama", "qwen2", "gpt2"]


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("side", ["right", "left"])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_engine_matches_float64_reference(arch, side, dtype, tmp_path):
    model = save_tiny_model(arch, tmp_path / arch).eval()
    model64 = copy.deepcopy(model).double()
    engine = BatchedGradStats(copy.deepcopy(model).to(dtype), proj_dim=48, proj_rank=4, seed=1,
                              fisher_dim=8, fisher_rank=3)
    examples = random_examples(5, seed=len(arch) + (side == "left"), vocab=VOCAB)
    tol = 1e-5 if dtype == torch.float64 else 1e-3
    out = check_against_reference(engine, model64, examples, side, tol)
    assert out.grad_proj.shape == (5, 48) and out.fisher_factor.shape == (5, 3, 8)
    groups = {k.rsplit(".", 1)[0] for k in out.columns if "." in k}
    assert {"embedding", "norm", "layer0.attn", "layer0.mlp", "layer1.attn", "layer1.mlp"} <= groups


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("sketch", ["cast", "half"])
def test_bfloat16_model_stays_within_bfloat16_precision(arch, sketch, tmp_path, monkeypatch):
    """The GPU's dtype, run on the CPU: the model in bfloat16, reductions in float32. The error is the
    bfloat16 model's own (measured 2026-11-23: norms <= 0.25%, max/min <= 1.3%, projection <= 0.8%).
    ``half``: the factors sketched in bfloat16 with float32 results, as on a GPU (emulated here)."""
    from tests.reference import reference, scale_of

    calls = []
    if sketch == "half":
        monkeypatch.setitem(factored.HALF_OUT, "cpu", "emulate")
        real = factored.half_matmul
        monkeypatch.setattr(factored, "half_matmul", lambda x, *a, **k: calls.append(x.shape) or real(x, *a, **k))
        from grads_ray.gradients import grouped
        monkeypatch.setattr(grouped, "half_matmul", factored.half_matmul)
    model = save_tiny_model(arch, tmp_path / arch).eval()
    model64 = copy.deepcopy(model).double()
    engine = BatchedGradStats(copy.deepcopy(model).to(torch.bfloat16), proj_dim=32, proj_rank=4, fisher_dim=8,
                              fisher_rank=2)
    examples = random_examples(6, seed=4, vocab=VOCAB)
    out = engine(*pad(examples, "left"))
    assert out.grad_proj.dtype == np.float32 and all(v.dtype == np.float64 for v in out.columns.values())
    for i, (x, y) in enumerate(examples):
        ref = reference(model64, x, y)
        for key, tol in (("loss", 0.01), ("grad_norm", 0.01), ("grad_std", 0.01), ("grad_mean", 0.01),
                         ("embedding.grad_norm", 0.01), ("grad_max", 0.05), ("grad_min", 0.05)):
            assert abs(out.columns[key][i] - ref[key]) <= tol * scale_of(ref, key), (key, i)
        want = engine.projector.project_full(ref["grads"]).numpy()
        assert np.linalg.norm(out.grad_proj[i] - want) <= 0.03 * np.linalg.norm(want)
    assert (len(calls) > 0) == (sketch == "half")  # the stacks' and the head's sketches took the half path
    if sketch == "half":  # against the float32 copies' sketch of the same batch: float32's rounding apart
        monkeypatch.setitem(factored.HALF_OUT, "cpu", None)
        cast = engine(*pad(examples, "left")).grad_proj
        assert np.linalg.norm(out.grad_proj - cast) <= 1e-4 * np.linalg.norm(cast)


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_extrema_off_uses_ghost_norm_and_small_blocks_change_nothing(arch, tmp_path, monkeypatch):
    """The ghost norm (no max/min) and forming the gradient in 1-row blocks give the same numbers."""
    model64 = save_tiny_model(arch, tmp_path / arch).eval().double()
    examples = random_examples(4, seed=11, vocab=VOCAB, lo=4, hi=6)  # short rows: the ghost is cheaper
    ids, labels, mask = pad(examples, "left")
    full = BatchedGradStats(model64, proj_dim=0, fisher_dim=0)(ids, labels, mask)
    calls = []
    real = factored.ghost_sumsq
    # parameters of one shape go through it as one stack of N·B rows: count parameters, not calls
    monkeypatch.setattr(factored, "ghost_sumsq", lambda terms: calls.append(terms[0].left.shape[0] // len(ids))
                        or real(terms))
    ghost = BatchedGradStats(model64, proj_dim=0, fisher_dim=0, extrema=False)(ids, labels, mask)
    cheaper = [n for n, p in model64.named_parameters()
               if p.dim() == 2 and "embed" not in n and "wte" not in n and "wpe" not in n
               and factored.ghost_cheaper(ids.shape[1], *p.shape)]
    assert len(cheaper) >= 5 and sum(calls) == len(cheaper)  # the ghost path where it is cheaper
    tiny = BatchedGradStats(model64, proj_dim=0, fisher_dim=0, chunk_elements=1)(ids, labels, mask)
    for key, value in full.columns.items():
        np.testing.assert_allclose(tiny.columns[key], value, rtol=1e-12, err_msg=key)
        if key.endswith(("grad_max", "grad_min")):
            assert np.isnan(ghost.columns[key]).all(), key
        else:
            np.testing.assert_allclose(ghost.columns[key], value, rtol=1e-10, err_msg=key)


def test_tied_llama_and_padding_idx(tmp_path):
    """A Llama whose head is tied to its embedding (dense head rows + sparse embedding rows in one
    matrix), and a padding_idx row that never receives a gradient, with the pad token in the data."""
    from transformers import AutoModelForCausalLM

    cfg = tiny_config("llama")
    cfg.tie_word_embeddings, cfg.pad_token_id = True, 0
    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(cfg).save_pretrained(tmp_path / "m")
    model64 = AutoModelForCausalLM.from_pretrained(tmp_path / "m").eval().double()
    assert model64.lm_head.weight is model64.model.embed_tokens.weight
    assert model64.model.embed_tokens.padding_idx == 0
    examples = random_examples(4, seed=5, vocab=VOCAB)
    examples[0][0][2] = 0  # the pad id as a real token
    engine = BatchedGradStats(model64, proj_dim=32, proj_rank=4, fisher_dim=0)
    check_against_reference(engine, model64, examples, "right", 1e-5, pad_id=0)


def test_lora_adapters_alone(tmp_path):
    """With peft LoRA adapters the statistics are those of the adapters' gradient (base frozen)."""
    from peft import LoraConfig, get_peft_model

    base = save_tiny_model("qwen2", tmp_path / "q").eval().double()
    torch.manual_seed(3)
    model = get_peft_model(base, LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "down_proj"],
                                            init_lora_weights=False)).eval()
    engine = BatchedGradStats(model, proj_dim=32, proj_rank=4, fisher_dim=0)
    assert all("lora_" in n for n in engine.params) and len(engine.params) == 12
    out = check_against_reference(engine, model, random_examples(3, seed=2, vocab=VOCAB), "left", 1e-5)
    assert {k.rsplit(".", 1)[0] for k in out.columns if "." in k} == {"layer0.attn", "layer0.mlp",
                                                                       "layer1.attn", "layer1.mlp"}


def test_partly_frozen_model_and_state_restored(tmp_path):
    """Only embedding and head trainable (the GrADS default groups): the engine sees just those, and
    leaves requires_grad and the model's outputs as they were."""
    model = save_tiny_model("llama", tmp_path / "m").eval().double()
    for name, p in model.named_parameters():
        p.requires_grad_(name.startswith(("model.embed_tokens", "lm_head")))
    before = {n: p.requires_grad for n, p in model.named_parameters()}
    engine = BatchedGradStats(model, proj_dim=16, proj_rank=4, fisher_dim=0)
    examples = random_examples(3, seed=9, vocab=VOCAB)
    out = check_against_reference(engine, model, examples, "right", 1e-5)
    assert {k.rsplit(".", 1)[0] for k in out.columns if "." in k} == {"embedding", "head"}
    assert before == {n: p.requires_grad for n, p in model.named_parameters()}
    again = engine(*pad(examples, "right"))
    for key, value in out.columns.items():
        np.testing.assert_array_equal(again.columns[key], value)
    np.testing.assert_array_equal(again.grad_proj, out.grad_proj)


def test_unsupported_module_is_refused_by_name(tmp_path, monkeypatch):
    """A parameter no specific rule covers and too big to replay is refused by name, with the key that
    scores it anyway."""
    from grads_ray.gradients import rules

    model = save_tiny_model("llama", tmp_path / "m")
    model.model.layers[0].self_attn.register_parameter("gate", torch.nn.Parameter(torch.ones(3)))
    monkeypatch.setattr(rules, "REPLAY_MAX", 2)
    with pytest.raises(UnsupportedModel, match=r"layers\.0\.self_attn\.gate \(LlamaAttention, 3 entries\).*"
                                               r"score\.engine=loop \(or auto\)"):
        BatchedGradStats(model)


@pytest.mark.parametrize("vmap", ["batched", "refused", "out of memory", "out of CPU memory"])
def test_unused_and_replayed_parameters(tmp_path, monkeypatch, vmap):
    """A parameter the forward never uses has a zero gradient, in the engine as in autograd; a small
    parameter of a module with no specific rule (here a per-head gate on attention's output) goes
    through the replay rule, exactly: its products batched, in chunks of one example or all, or one
    by one where an op refuses autograd's vmap; running out of memory there is raised, not retried."""
    if vmap != "batched":
        real_grad = torch.autograd.grad
        error = {"refused": RuntimeError("Batching rule not implemented for aten::something"),
                 "out of memory": torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 20.00 GiB"),
                 "out of CPU memory": RuntimeError("[enforce fail at alloc_cpu.cpp:121] data. DefaultCPUAllocator: "
                                                   "can't allocate memory: you tried to allocate 21474836480 bytes.")
                 }[vmap]

        def no_vmap(*args, is_grads_batched=False, **kwargs):
            if is_grads_batched:
                raise error
            return real_grad(*args, **kwargs)

        monkeypatch.setattr(torch.autograd, "grad", no_vmap)
    model64 = save_tiny_model("llama", tmp_path / "m").double()
    attn = model64.model.layers[1].self_attn
    attn.register_parameter("unused", torch.nn.Parameter(torch.ones(5, dtype=torch.float64)))
    attn.register_parameter("head_gate", torch.nn.Parameter(torch.linspace(0.5, 1.5, 16, dtype=torch.float64)))
    real = type(attn).forward

    def gated(self, *args, **kwargs):
        out, weights = real(self, *args, **kwargs)
        return out * self.head_gate, weights

    attn.forward = gated.__get__(attn)
    engine = BatchedGradStats(model64, proj_dim=24, proj_rank=4, fisher_dim=0)
    rules = {e.name: e.rule for use in engine.uses for e in use.entries}
    assert rules["model.layers.1.self_attn.head_gate"] == "replay"
    if vmap.startswith("out of"):
        ids, labels, mask = pad(random_examples(4, seed=3, vocab=VOCAB), "right")
        with pytest.raises(type(error), match="memory"):
            engine(ids, labels, mask, left_padded=False)
        return
    check_against_reference(engine, model64, random_examples(4, seed=3, vocab=VOCAB), "right", 1e-5)
    one_at_a_time = BatchedGradStats(model64, proj_dim=24, proj_rank=4, fisher_dim=0, chunk_elements=1)
    check_against_reference(one_at_a_time, model64, random_examples(3, seed=4, vocab=VOCAB), "left", 1e-5)


# -- the pure functions --------------------------------------------------------------------------


def _random_terms(seed: int, b=3, t=6, rows=7, cols=5, with_rows=True):
    g = torch.Generator().manual_seed(seed)
    mask = torch.rand((b, t), generator=g) > 0.3
    left = torch.randn((b, t, rows), generator=g, dtype=torch.float64) * mask[..., None]
    right = torch.randn((b, t, cols), generator=g, dtype=torch.float64) * mask[..., None]
    terms: list = [factored.Dense(left, right)]
    dense = torch.einsum("btr,btc->brc", left, right)
    if with_rows:
        index = torch.where(mask, torch.randint(0, rows, (b, t), generator=g), -1)
        r2 = torch.randn((b, t, cols), generator=g, dtype=torch.float64)
        terms.append(factored.Rows(index, r2))
        for i in range(b):
            for j in range(t):
                if index[i, j] >= 0:
                    dense[i, index[i, j]] += r2[i, j]
    return terms, dense


@pytest.mark.parametrize("seed", range(4))
def test_factored_moments_against_formed_gradients(seed):
    for with_rows in (False, True):
        terms, dense = _random_terms(seed, with_rows=with_rows)
        flat = dense.flatten(1)
        for chunk in (1, 10, 1 << 20):
            m = factored.matrix_moments(terms, 7, 5, chunk_elements=chunk)
            torch.testing.assert_close(m.s, flat.sum(1))
            torch.testing.assert_close(m.ss, flat.square().sum(1))
            torch.testing.assert_close(m.mx, flat.amax(1))
            torch.testing.assert_close(m.mn, flat.amin(1))
        if not with_rows:
            torch.testing.assert_close(factored.ghost_sumsq(terms), flat.square().sum(1))
        p_r = torch.randn(3, 7, dtype=torch.float64)
        p_c = torch.randn(2, 5, dtype=torch.float64)
        torch.testing.assert_close(factored.project_terms(terms, p_r, p_c),
                                   torch.einsum("kr,brc,jc->bkj", p_r, dense, p_c).flatten(1))


def test_sparse_rows_count_untouched_rows_as_zero():
    """All contributions positive: the max is theirs, the min is 0 from an untouched row, unless
    every row is touched."""
    right = torch.ones((1, 3, 2), dtype=torch.float64)
    some = factored.matrix_moments([factored.Rows(torch.tensor([[0, 1, 1]]), right)], rows=3, cols=2)
    assert some.mx.item() == 2.0 and some.mn.item() == 0.0 and some.ss.item() == 1 + 1 + 4 + 4
    every = factored.matrix_moments([factored.Rows(torch.tensor([[0, 1, 2]]), right)], rows=3, cols=2)
    assert every.mn.item() == 1.0


def test_projection_is_seeded_per_parameter_and_keeps_norms():
    shapes = {"a": (40, 30), "b": (30,), "c": (50, 20)}
    p = Projector(shapes, dim=256, rank=8, seed=4)
    q = Projector({"a": (40, 30)}, dim=256, rank=8, seed=4)
    assert torch.equal(p.blocks["a"][0], q.blocks["a"][0])  # other parameters do not shift the draw
    assert not torch.equal(p.blocks["a"][0], Projector(shapes, dim=256, rank=8, seed=5).blocks["a"][0])
    g = torch.Generator().manual_seed(0)
    ratios = []
    for _ in range(200):
        grads = {n: torch.randn(s, generator=g, dtype=torch.float64) for n, s in shapes.items()}
        total = sum(v.square().sum() for v in grads.values())
        ratios.append((p.project_full(grads).square().sum() / total).item())
    assert abs(np.mean(ratios) - 1.0) < 0.1  # E‖Mg‖² = ‖g‖²


class _TanhNorm(torch.nn.Module):
    """A "norm" with no closed form in the engine: y = w · tanh(x)."""

    def __init__(self, d):
        super().__init__()
        self.weight = torch.nn.Parameter(torch.linspace(0.5, 1.5, d, dtype=torch.float64))

    def forward(self, x):
        return self.weight * torch.tanh(x)


class _GemmaStyleRMSNorm(torch.nn.Module):
    """RMSNorm with the (1 + w) scale: the closed form x̂ still applies."""

    def __init__(self, d):
        super().__init__()
        self.weight = torch.nn.Parameter(torch.linspace(-0.2, 0.3, d, dtype=torch.float64))
        self.eps = 1e-6

    def forward(self, x):
        return (1 + self.weight) * (x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps))


@pytest.mark.parametrize("module, closed", [(torch.nn.LayerNorm(6, dtype=torch.float64), True),
                                            (_GemmaStyleRMSNorm(6), True), (_TanhNorm(6), False)])
def test_norm_jacobian_closed_form_or_forward_ad(module, closed):
    """Per-example Σ_t δ_t ⊙ ∂y_t/∂w equals each example's autograd weight gradient, whichever way
    the engine found ∂y/∂w (closed form only where it checked out against forward-mode AD)."""
    from grads_ray.gradients.rules import elementwise_jacobian, norm_jacobian

    fn = norm_jacobian(module, "weight")
    assert (fn is not elementwise_jacobian) == closed
    g = torch.Generator().manual_seed(1)
    x = torch.randn((3, 5, 6), generator=g, dtype=torch.float64)
    delta = torch.randn((3, 5, 6), generator=g, dtype=torch.float64)
    with torch.no_grad():
        fast = (delta * fn(module, "weight", x)).sum(1)
    for i in range(3):
        (want,) = torch.autograd.grad((module(x[i]) * delta[i]).sum(), [module.weight])
        torch.testing.assert_close(fast[i], want)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_rms_norm_hat_of_half_input_is_transformers_own(dtype):
    """A half-precision RMSNorm's x̂ (its input read as it is, the mean square in one float32
    reduction) against transformers' own float32 arithmetic, whose x̂ times the weight the module
    returns: the same half values but for rounding ties (the mean square summed in another order)."""
    from transformers.models.llama.modeling_llama import LlamaRMSNorm

    from grads_ray.gradients.rules import NormHat, norm_jacobian

    module = LlamaRMSNorm(64, eps=1e-6).to(dtype)
    hat = norm_jacobian(module, "weight")
    assert hat == NormHat("rms32", 1e-6)
    x = (torch.randn((4, 7, 64), generator=torch.Generator().manual_seed(2)) * 3).to(dtype)
    with torch.no_grad():
        module.weight.fill_(1.0)
        want = module(x)  # weight 1: the module's own x̂ in its dtype
    got = hat(module, "weight", x)
    assert got.dtype == dtype
    assert (got != want).float().mean() < 0.01 and torch.allclose(got.float(), want.float(), rtol=1e-2, atol=0)


def test_a_vocabulary_sized_block_sums_its_squares_without_drift():
    """Four million float32 entries (a head's gradient, 8192 x 512) squared and summed: along a row in
    float32, across rows in float64. One float32 sum over all of them drifts by 2e-4 relative, which
    the self-check saw on a MoE model's head before this was so."""
    g = torch.Generator().manual_seed(0)
    left, right = torch.randn(2, 8, 8192, generator=g), torch.randn(2, 8, 512, generator=g)
    m = factored.matrix_moments([factored.Dense(left, right)], 8192, 512)
    want = torch.einsum("btr,btc->brc", left.double(), right.double()).square().sum((1, 2))
    assert ((m.ss - want).abs() / want).max().item() < 1e-6


def test_token_layouts_and_what_cannot_be_placed():
    """Every layout a module may see a batch of B=3 examples of T=5 tokens in -> (B, P, F) positions
    of each example, the mask laid out the same way; rows a module gathered itself -> None."""
    from grads_ray.gradients.layout import index_layout, token_layout

    b, t = 3, 5
    mask = torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1], [1, 0, 0, 0, 0]], dtype=torch.bool)
    for lead, positions in [((b, t), t), ((b, t, 4), t * 4), ((b, 4, t), 4 * t), ((b * t,), t), ((1, b * t), t),
                            ((b * t * 2,), t * 2), ((b * t, 4), t * 4), ((b * 4, t), 4 * t), ((b,), 1)]:
        lay = token_layout(lead, b, t)
        assert lay is not None and lay.positions == positions, lead
        x = torch.arange(int(np.prod(lead)) * 2, dtype=torch.float64).reshape(*lead, 2)
        assert lay.view(x).shape == (b, positions, 2)
        m = lay.mask(mask)  # each real token counted once per position it has
        assert m.shape == (b, positions)
        assert m.sum(1).tolist() == ([1, 1, 1] if lead == (b,) else (mask.sum(1) * (positions // t)).tolist()), lead
    for lead in [(7,), (b * t - 1, 4), (t, b), (2, b, t)]:
        assert token_layout(lead, b, t) is None, lead
    assert index_layout((b, t), b, t) == "bt" and index_layout((t,), b, t) == "shared"
    assert index_layout((t, b), b, t) is None


def test_the_engines_parts_are_named_for_a_profiler_and_change_no_number(tmp_path):
    """benchmarks/grad_stats.py's profile section reads each part's GPU time from these ranges."""
    from torch.profiler import ProfilerActivity, profile

    model = save_tiny_model("llama", tmp_path / "llama").eval()
    engine = BatchedGradStats(model, proj_dim=16, proj_rank=4, fisher_dim=0)
    batch = pad(random_examples(3, seed=2, vocab=VOCAB), "right")
    alone = engine(*batch)
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        watched = engine(*batch)
    names = {e.name for e in prof.events() if e.name.startswith("grads_ray.")}
    assert {"grads_ray.forward", "grads_ray.backward", "grads_ray.dense_moments", "grads_ray.finish"} <= names
    for column, values in alone.columns.items():
        np.testing.assert_array_equal(values, watched.columns[column])
    np.testing.assert_array_equal(alone.grad_proj, watched.grad_proj)
