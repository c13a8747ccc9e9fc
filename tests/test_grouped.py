"""Same-shaped parameters reduced as one stack (``gradients.grouped``), the moment table's per-group
statistics, the sync-free sparse rows, and the engine's pass: the same numbers whatever the stacks
(one flush or one per parameter), and nothing in the pass that waits for the device."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
from torch.overrides import TorchFunctionMode

from grads_ray.gradients import factored, grouped
from grads_ray.gradients.engine import BatchedGradStats
from tests.conftest import VOCAB, save_tiny_model
from tests.reference import pad, random_examples


def _stack(seed: int, n=3, b=4, p=5, r=6, c=7):
    g = torch.Generator().manual_seed(seed)
    keep = torch.rand((b, p), generator=g) > 0.3
    left = torch.randn((n, b, p, r), generator=g, dtype=torch.float64)
    right = torch.randn((n, b, p, c), generator=g, dtype=torch.float64)
    return left, right, keep


@pytest.mark.parametrize("extrema", [True, False])
def test_a_stack_of_matrices_equals_each_matrix_alone(extrema):
    left, right, keep = _stack(0)
    ml, mr = grouped.zero_padding_(left.clone(), keep), grouped.zero_padding_(right.clone(), keep)
    got = grouped.dense_moments(ml, mr, extrema=extrema, chunk_elements=40)  # several row blocks
    p_rows = torch.randn((3, 2, 6), dtype=torch.float64)
    p_cols = torch.randn((3, 3, 7), dtype=torch.float64)
    sketch = grouped.dense_project(ml, mr, p_rows, p_cols)
    for j in range(3):
        g = torch.einsum("bpr,bpc->brc", ml[j], mr[j]).flatten(1)  # each example's whole gradient
        torch.testing.assert_close(got[j, 0], g.sum(1))
        torch.testing.assert_close(got[j, 1], g.square().sum(1))
        if extrema:
            torch.testing.assert_close(got[j, 2], g.amax(1))
            torch.testing.assert_close(got[j, 3], g.amin(1))
        else:
            assert got[j, 2:].isnan().all()
        want = torch.einsum("kr,brc,jc->bkj", p_rows[j], g.view(-1, 6, 7), p_cols[j]).flatten(1)
        torch.testing.assert_close(sketch[j], want)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_factors_sketched_without_a_float32_copy(dtype, monkeypatch):
    """The GPU's sketch of half-precision factors (no float32 copy of the stack; ``out_dtype``),
    emulated: the sketch matrix split in two halves agrees with the float32 sketch of the same
    factors to float32's rounding, where the matrix rounded once to ``dtype`` is off by ~1e-3."""
    monkeypatch.setitem(factored.HALF_OUT, "cpu", "emulate")
    left, right, keep = _stack(3, b=5, p=9, r=40, c=24)
    ml = grouped.zero_padding_(left.clone(), keep).to(dtype)
    mr = grouped.zero_padding_(right.clone(), keep).to(dtype)
    g = torch.Generator().manual_seed(1)
    p_rows = torch.randn((3, 4, 40), generator=g) / 2
    p_cols = torch.randn((3, 4, 24), generator=g) / 2
    split = tuple(factored.split_half(m.transpose(1, 2), dtype) for m in (p_rows, p_cols))
    assert split[0].shape == (3, 40, 8) and split[0].dtype == dtype
    hi_lo = split[0][..., :4].double() + split[0][..., 4:].double()
    assert (hi_lo - p_rows.transpose(1, 2).double()).abs().max() <= 2**-15 * p_rows.abs().max()
    assert factored.half_out(ml)
    want = grouped.dense_project(ml.double(), mr.double(), p_rows.double(), p_cols.double())
    cast = grouped.dense_project(ml, mr, p_rows, p_cols)  # the factors cast to float32
    got = grouped.dense_project(ml, mr, p_rows, p_cols, split)
    once = grouped.dense_project(ml, mr, p_rows, p_cols, tuple(torch.cat([m[..., :m.shape[-1] // 2],
                                 torch.zeros_like(m[..., :m.shape[-1] // 2])], -1) for m in split))
    assert got.dtype == torch.float32 and got.shape == want.shape
    def err(x):
        return ((x.double() - want).norm() / want.norm()).item()
    assert err(cast) < 1e-6 and err(got) < 3e-5 and err(once) > 1e-4, (err(cast), err(got), err(once))
    monkeypatch.setitem(factored.HALF_OUT, "cpu", None)
    assert not factored.half_out(ml)
    torch.testing.assert_close(grouped.dense_project(ml, mr, p_rows, p_cols, split), cast, rtol=0, atol=0)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16])
def test_a_stack_of_vectors_equals_each_vector_alone(dtype):
    """The stack's table is float64 whatever g's dtype (its extrema promoted by the stack, exactly)."""
    g = torch.randn((4, 3, 9), dtype=torch.float64).to(dtype)
    got = grouped.vector_moments_stack(g, extrema=True)
    assert got.dtype == torch.float64 and got.shape == (4, 4, 3)
    p_vec = torch.randn((4, 5, 9), dtype=torch.float64)
    sketch = grouped.vector_project(g, p_vec)
    for j in range(4):
        m = factored.vector_moments(g[j])
        for k, v in enumerate((m.s, m.ss, m.mx, m.mn)):
            torch.testing.assert_close(got[j, k], v, rtol=0, atol=0)
        torch.testing.assert_close(sketch[j], g[j].double() @ p_vec[j].T)
    off = grouped.vector_moments_stack(g, extrema=False)
    assert off[:, 2:].isnan().all() and torch.equal(off[:, :2], got[:, :2])


@pytest.mark.parametrize("into", [True, False])
def test_unstacked_sketch_written_in_place_or_copied(into, monkeypatch):
    """The GPU's half sketch of unstacked members (``mm`` with ``out_dtype``, each member written into
    its slot with ``out=``, or copied there where a torch takes no ``out=`` with ``out_dtype``), faked
    on the CPU: the same numbers as the emulated path, and the float64 sketch to float32's rounding."""
    real_mm, real_bmm = torch.mm, torch.bmm

    def fake_mm(a, b, out_dtype=None, out=None):
        if out_dtype is None:
            return real_mm(a, b) if out is None else real_mm(a, b, out=out)
        if out is not None and not into:
            raise RuntimeError("mm.dtype_out: not here")
        got = real_mm(a.float(), b.float())
        return got if out is None else out.copy_(got)

    def fake_bmm(a, b, out_dtype=None, out=None):
        if out_dtype is None:
            return real_bmm(a, b) if out is None else real_bmm(a, b, out=out)
        return real_bmm(a.float(), b.float())

    left, right, keep = _stack(5, n=3, b=4, p=6, r=40, c=24)
    left[:, ~keep] = float("nan")  # the members as the pass left them: padding unmasked
    lefts, rights = [x.to(torch.bfloat16) for x in left], [x.to(torch.bfloat16) for x in right]
    g = torch.Generator().manual_seed(2)
    p_rows, p_cols = torch.randn((3, 4, 40), generator=g), torch.randn((3, 4, 24), generator=g)
    split = tuple(factored.split_half(m.transpose(1, 2), torch.bfloat16) for m in (p_rows, p_cols))
    monkeypatch.setitem(factored.HALF_OUT, "cpu", "emulate")
    want = grouped.unstacked_project(lefts, rights, keep, p_rows, p_cols, split)
    monkeypatch.setitem(factored.HALF_OUT, "cpu", "native")
    monkeypatch.setattr(factored, "_NATIVE_OK", {})
    monkeypatch.setattr(torch, "mm", fake_mm)
    monkeypatch.setattr(torch, "bmm", fake_bmm)
    assert factored.half_out(lefts[0]) and factored._NATIVE_OK["cpu:into"] is into
    got = grouped.unstacked_project(lefts, rights, keep, p_rows, p_cols, split)
    monkeypatch.undo()
    assert got.isfinite().all()
    torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-6)
    ml = grouped.zero_padding_(torch.stack(lefts).double(), keep)
    exact = grouped.dense_project(ml, torch.stack(rights).double(), p_rows.double(), p_cols.double())
    assert ((got.double() - exact).norm() / exact.norm()).item() < 3e-5


def test_group_statistics_equal_merged_moments():
    """The table's per-group and overall statistics against ``Moments.merge``/``finish`` of each
    parameter's moments, groups interleaved."""
    gen = torch.Generator().manual_seed(3)
    p, b = 7, 5
    table = torch.randn((p, 4, b), generator=gen, dtype=torch.float64)
    table[:, 1] = table[:, 1].abs() * 10  # sums of squares
    group = [0, 1, 0, 2, 1, 1, 2]
    member = torch.tensor([[g == k for g in group] for k in range(3)])
    numel = torch.tensor([3.0, 5, 7, 11, 2, 4, 6], dtype=torch.float64)
    got = grouped.group_statistics(table, member, numel)

    def moments(i):
        return factored.Moments(int(numel[i]), *table[i].unbind(0))

    merged = {k: None for k in range(3)}
    total = None
    for i, k in enumerate(group):
        merged[k] = moments(i) if merged[k] is None else merged[k].merge(moments(i))
        total = moments(i) if total is None else total.merge(moments(i))
    for row, m in enumerate([total, merged[0], merged[1], merged[2]]):
        for col, v in enumerate(m.finish().values()):
            torch.testing.assert_close(got[row, col], v)


def test_sparse_rows_ignore_uncounted_positions_and_see_every_row_touched():
    """A position with index -1 (padding, a padding_idx row) adds nothing even where its δ is not zero;
    an example that touches every row has no zero row for max/min. Against the formed gradient."""
    gen = torch.Generator().manual_seed(5)
    rows, b, t, c = 4, 3, 9, 2
    index = torch.randint(0, rows, (b, t), generator=gen)
    index[0, :3] = -1
    index[1] = torch.tensor([0, 1, 2, 3, 0, 1, 2, 3, 3])  # every row touched
    right = torch.randn((b, t, c), generator=gen, dtype=torch.float64) + 3.0  # positive: min is a real entry
    ss, mx, mn = factored.rows_moments([factored.Rows(index, right)], rows)
    for i in range(b):
        g = torch.zeros((rows, c), dtype=torch.float64)
        for j in range(t):
            if index[i, j] >= 0:
                g[index[i, j]] += right[i, j]
        torch.testing.assert_close(ss[i], g.square().sum())
        torch.testing.assert_close(mx[i], g.max())
        torch.testing.assert_close(mn[i], g.min())
    assert mn[1] > 0 and mn[0] == 0.0  # example 1 has no untouched row


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_the_stacks_change_nothing(arch, tmp_path):
    """Stacks of every layer's same-shaped parameters, or each parameter reduced alone (``hold_bytes=0``,
    the per-parameter path of ``factored``): the same numbers, float64, to rounding."""
    model = save_tiny_model(arch, tmp_path / arch).eval().double()
    batch = pad(random_examples(5, seed=2, vocab=VOCAB), "right")
    one = BatchedGradStats(model, proj_dim=32, proj_rank=4, fisher_dim=8, fisher_rank=2, keep_params=True)(*batch)
    each = BatchedGradStats(copy.deepcopy(model), proj_dim=32, proj_rank=4, fisher_dim=8, fisher_rank=2,
                            keep_params=True, hold_bytes=0)(*batch)
    for key, value in one.columns.items():
        np.testing.assert_allclose(each.columns[key], value, rtol=1e-12, atol=0, err_msg=key)
    np.testing.assert_allclose(each.grad_proj, one.grad_proj, rtol=1e-5, atol=1e-6)  # float32 out
    for name, m in one.params.items():
        for k in ("s", "ss", "mx", "mn"):
            np.testing.assert_allclose(each.params[name][k], m[k], rtol=1e-12, atol=1e-300, err_msg=name)


def test_one_engine_on_batches_of_other_sizes(tmp_path):
    """The engine's caches by stack and batch size (the count sketch's targets among them): batches of
    5, 3 and 5 examples through one engine give what a fresh engine gives each, bit for bit."""
    model = save_tiny_model("llama", tmp_path / "m").eval()
    kw = dict(proj_dim=32, proj_rank=4, fisher_dim=8, fisher_rank=2, hold_bytes=1 << 16)  # several flushes
    engine = BatchedGradStats(model, **kw)
    for n, seed in ((5, 1), (3, 2), (5, 3)):
        batch = pad(random_examples(n, seed=seed, vocab=VOCAB), "right")
        got, want = engine(*batch), BatchedGradStats(model, **kw)(*batch)
        np.testing.assert_array_equal(got.grad_proj, want.grad_proj)
        for key, value in want.columns.items():
            np.testing.assert_array_equal(got.columns[key], value, err_msg=key)


def _count_host_reads(monkeypatch, seen: list[str]) -> None:
    """Wrap the Tensor methods that read a tensor on the host: their calls are appended to ``seen``
    wherever they happen, backward hooks included (a torch-function mode does not see inside
    autograd's backward)."""
    for name in ("item", "cpu", "tolist", "numpy", "nonzero", "unique", "__bool__", "__int__", "__float__"):
        real = getattr(torch.Tensor, name)
        monkeypatch.setattr(torch.Tensor, name, lambda self, *a, _n=name, _r=real, **k: seen.append(_n) or _r(self, *a, **k))


SYNCS = ("nonzero", "unique", "unique_consecutive", "bincount", "masked_select", "item", "tolist", "cpu", "numpy",
         "__bool__", "__int__", "__float__", "__index__")


class _Reads(TorchFunctionMode):
    """Counts the calls that read a tensor on the host (on a GPU each waits for the device)."""

    def __init__(self):
        super().__init__()
        self.seen: list[str] = []

    def __torch_function__(self, func, types, args=(), kwargs=None):
        name = getattr(func, "__name__", "")
        if name in SYNCS:
            self.seen.append(name)
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize("arch", ["qwen2", "gpt2"])
def test_the_pass_reads_the_device_once(arch, tmp_path, monkeypatch):
    """The engine's pass on the job's right-padded batches reads nothing on the host but its one copy
    out (``cpu`` then ``numpy``) beyond what the model's own forward reads (a plain training step of
    the same batch is that floor)."""
    model = save_tiny_model(arch, tmp_path / arch).eval()
    ids, labels, mask = pad(random_examples(4, seed=1, vocab=VOCAB), "right")
    engine = BatchedGradStats(model, proj_dim=32, proj_rank=4, fisher_dim=8, fisher_rank=2)
    engine(ids, labels, mask, left_padded=False)
    with _Reads() as plain:
        logits = model(input_ids=ids, attention_mask=mask, use_cache=False).logits
        torch.nn.functional.cross_entropy(logits[:, :-1].flatten(0, 1), labels[:, 1:].flatten()).backward()
    model.zero_grad(set_to_none=True)
    with _Reads() as ours:
        engine(ids, labels, mask, left_padded=False)
    extra = list(ours.seen)
    for name in plain.seen:
        extra.remove(name)
    assert sorted(extra) == ["cpu", "numpy"], extra
    seen: list[str] = []  # again with the Tensor methods wrapped: the backward's hooks seen too
    _count_host_reads(monkeypatch, seen)
    logits = model(input_ids=ids, attention_mask=mask, use_cache=False).logits
    torch.nn.functional.cross_entropy(logits[:, :-1].flatten(0, 1), labels[:, 1:].flatten()).backward()
    model.zero_grad(set_to_none=True)
    plain, seen[:] = list(seen), []
    BatchedGradStats(model, proj_dim=32, proj_rank=4, fisher_dim=8, fisher_rank=2, hold_bytes=1 << 16)(
        ids, labels, mask, left_padded=False)  # stacks flushed inside the backward too
    for name in plain:
        seen.remove(name)
    assert sorted(seen) == ["cpu", "numpy"], seen


@pytest.mark.parametrize("max_buckets", [1, 2, 3, 8])
def test_expert_blocks_hold_each_experts_pairs_of_each_example(max_buckets):
    """block_layout's stacks, pairs in any order and some left out: each (expert, example) block sums to
    that example's pairs routed to that expert, the padding is zero, no block of a pair-less
    (expert, example) exists and at most ``max_buckets`` stacks are made."""
    from grads_ray.gradients import experts as moe

    g = torch.Generator().manual_seed(max_buckets)
    b, t, n_experts, s = 3, 11, 5, 90
    expert = torch.randint(0, n_experts, (s,), generator=g)
    tokens = torch.randint(0, b * t, (s,), generator=g)
    keep = torch.rand(s, generator=g) > 0.2
    values = torch.randn((s, 4), generator=g, dtype=torch.float64)
    lay = moe.block_layout(expert, tokens, keep, b, t, n_experts, max_buckets=max_buckets)
    assert len(lay.buckets) <= max_buckets
    want = torch.zeros((n_experts * b, 4), dtype=torch.float64)
    want.index_add_(0, (expert * b + tokens // t)[keep], values[keep])
    got = torch.zeros_like(want)
    seen = []
    for m, ids, starts in lay.buckets:
        pairs = slice(int(starts[0]), int(starts[-1]))
        slot = lay.local[lay.block[pairs]] * m + lay.rank[pairs]
        stack = moe.stack_pairs(values[lay.order][pairs], slot, len(ids) * m).view(len(ids), m, -1)
        assert (lay.rank[pairs] < m).all()
        got[torch.as_tensor(ids)] = stack.sum(1)
        seen += ids.tolist()
    torch.testing.assert_close(got, want)
    assert sorted(seen) == sorted(set((expert * b + tokens // t)[keep].tolist()))


@pytest.mark.parametrize("seed", range(40))
def test_stack_levels_place_every_pair_once_and_bound_the_padding(seed):
    """Any routing: the levels' slots are distinct rows inside the stacks, each row of a level belongs
    to one of its experts at a rank the level spans, a cut plan costs under 0.8x the one stack (padded
    rows and gathered weights), and even routing keeps the one stack."""
    from grads_ray.gradients import experts as moe

    rng = np.random.default_rng(seed)
    n_experts = int(rng.integers(2, 40))
    skew = rng.dirichlet(np.full(n_experts, 0.05 if seed % 2 else 50.0))
    counts = rng.multinomial(int(rng.integers(1, 3000)), skew)
    row_cost, expert_cost = int(rng.integers(1, 100)), int(rng.integers(0, 5000))
    levels = moe.stack_levels(counts, row_cost=row_cost, expert_cost=expert_cost)
    assert 1 <= len(levels) <= 3 and levels[0].start == 0 and all(lv.height > 0 for lv in levels)
    assert levels[-1].start + levels[-1].height == max(counts.max(), 1)
    expert = torch.as_tensor(np.repeat(np.arange(n_experts), counts))
    rank = torch.as_tensor(np.concatenate([np.arange(c) for c in counts]), dtype=torch.long)
    ok = torch.rand(len(expert), generator=torch.Generator().manual_seed(seed)) > 0.1
    slot = moe.level_slots(levels, expert, rank, ok, n_experts)
    total = levels[-1].offset + levels[-1].size * levels[-1].height
    assert (slot[~ok] == total).all() and len(set(slot[ok].tolist())) == int(ok.sum()) and (slot[ok] < total).all()
    for lv in levels:  # the rows of a level: its experts' ranks in [start, start + height)
        inside = ok & (slot >= lv.offset) & (slot < lv.offset + lv.size * lv.height)
        members = np.arange(n_experts) if lv.experts is None else lv.experts
        place = (slot[inside] - lv.offset) // lv.height
        assert (torch.as_tensor(members)[place] == expert[inside]).all()
        assert ((slot[inside] - lv.offset) % lv.height == rank[inside] - lv.start).all()
    one = n_experts * max(counts.max(), 1)
    if len(levels) > 1 or levels[0].experts is not None:  # cut: cheaper than the one stack by the margin
        gathered = sum(lv.size for lv in levels if lv.experts is not None)
        assert total * row_cost + gathered * expert_cost < 0.8 * one * row_cost
    else:
        assert total == one
    if seed % 2 == 0 and counts.max() <= 1.2 * counts.mean():
        assert len(levels) == 1


def test_stack_levels_with_no_pair_make_one_row_an_expert():
    """No pair routed to these experts (all expert-parallel sentinels, or no token): one stack of one
    row an expert, and experts_forward returns zeros as the module does."""
    from grads_ray.gradients import experts as moe

    assert moe.stack_levels(np.zeros(5, np.int64), row_cost=7, expert_cost=0) == [moe.Level(0, 1, None, 0, 5)]
    from transformers import MixtralConfig
    from transformers.models.mixtral.modeling_mixtral import MixtralExperts

    cfg = MixtralConfig(hidden_size=8, intermediate_size=12, num_local_experts=4, num_experts_per_tok=2)
    module = MixtralExperts(cfg).double()
    for w in module.parameters():  # (the class leaves them empty)
        torch.nn.init.normal_(w, generator=torch.Generator().manual_seed(0))
    hidden = torch.randn(3, 8, dtype=torch.float64)
    index = torch.full((3, 2), 4)  # the sentinel: no expert on this rank
    weights = torch.rand(3, 2, dtype=torch.float64)
    out = moe.experts_forward(module, hidden, index, weights, grouped=False)
    assert out.shape == (3, 8) and not out.any()
    torch.testing.assert_close(out, module(hidden, index, weights))


def test_a_mixture_of_experts_scores_the_same_twice_on_two_threads():
    """Deterministic for a seed on a multi-threaded CPU: the experts' gathers take ``index_select``
    there, since advanced indexing's accumulating backward gave ~1e-7 run-to-run differences."""
    from transformers import AutoModelForCausalLM, Qwen3MoeConfig

    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        torch.manual_seed(0)
        cfg = Qwen3MoeConfig(hidden_size=256, moe_intermediate_size=176, intermediate_size=688, num_hidden_layers=2,
                             num_attention_heads=4, num_key_value_heads=4, head_dim=64, num_experts=16,
                             num_experts_per_tok=4, vocab_size=512)  # sizes where the threads split the work
        model = AutoModelForCausalLM.from_config(cfg).eval()
        ids, labels, mask = pad(random_examples(4, seed=2, vocab=500, lo=56, hi=64), "right")
        engine = BatchedGradStats(model, proj_dim=32, proj_rank=4, fisher_dim=0)
        runs = [engine(ids, labels, mask, left_padded=False) for _ in range(3)]
    finally:
        torch.set_num_threads(threads)
    for other in runs[1:]:
        for key, value in runs[0].columns.items():
            np.testing.assert_array_equal(other.columns[key], value, err_msg=key)
        np.testing.assert_array_equal(other.grad_proj, runs[0].grad_proj)


@pytest.mark.parametrize("skew", ["to k experts", "zipf"])
def test_stack_levels_cut_a_skewed_routing(skew):
    """All tokens to the same k of E experts (the padded stack's worst case: E/k times the pairs): one
    stack of just those k experts, no padding. Zipf-like counts (the e-th expert cap/e): 42x the pairs
    in one stack, under 3x cut."""
    from grads_ray.gradients import experts as moe

    if skew == "zipf":
        counts = (4096 / np.arange(1, 257)).astype(np.int64)
    else:
        counts = np.r_[np.full(8, 4096), np.zeros(120, np.int64)]
    levels = moe.stack_levels(counts, row_cost=6400, expert_cost=4_718_592)  # Qwen3-30B-A3B's widths
    total = levels[-1].offset + levels[-1].size * levels[-1].height
    if skew == "zipf":
        assert len(counts) * counts.max() > 40 * counts.sum() and total < 3 * counts.sum(), levels
    else:
        assert total == counts.sum() and len(levels) == 1 and levels[0].experts.tolist() == list(range(8)), levels


def test_a_mixture_of_experts_reads_the_device_once_a_layer_and_weight(tmp_path, monkeypatch):
    """On a MoE model the pass reads the host once per experts call (the experts' counts: the padded
    stacks' sizes) and
    once per expert weight (its blocks' counts), not once per expert, beyond what a plain training step reads (:func:`_count_host_reads`)."""
    from tests.families import build_family, eager_experts

    model = eager_experts(build_family("mixtral", tmp_path / "mixtral")).eval()
    ids, labels, mask = pad(random_examples(4, seed=1, vocab=VOCAB - 7, lo=4, hi=21), "right")
    engine = BatchedGradStats(model, proj_dim=32, proj_rank=4, fisher_dim=0)
    engine(ids, labels, mask, left_padded=False)
    seen: list[str] = []
    _count_host_reads(monkeypatch, seen)
    logits = model(input_ids=ids, attention_mask=mask, use_cache=False).logits
    torch.nn.functional.cross_entropy(logits[:, :-1].flatten(0, 1), labels[:, 1:].flatten()).backward()
    model.zero_grad(set_to_none=True)
    plain, seen[:] = list(seen), []
    engine(ids, labels, mask, left_padded=False)
    layers = model.config.num_hidden_layers
    ours = sorted(n for n in seen if n in ("item", "cpu", "numpy", "tolist", "nonzero", "unique"))
    assert ours == sorted(["cpu", "numpy"] * (3 * layers + 1)), seen  # + the copy out
    assert seen.count("__bool__") <= plain.count("__bool__"), (seen, plain)  # the model's own mask checks
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        engine(ids, labels, mask, left_padded=False)
    waits = {"aten::bincount", "aten::nonzero", "aten::unique", "aten::_unique2", "aten::masked_select",
             "aten::repeat_interleave"}  # ops that read the device on a GPU to size their output
    assert not [e.name for e in prof.events() if e.name in waits]
