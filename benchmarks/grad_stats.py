"""Exact per-example gradient statistics: the batched engine against the per-example loop and against
plain batched training, on the same model, data and device, measured in the same run.
``plain/loop`` is how much faster a batched training step processes tokens than the loop: the most
any exact batched engine can gain over the loop, since it must do at least that step's work.

For each batch size B and sequence length T it times
- ``engine``: ``BatchedGradStats`` on a padded batch (every statistic, overall and per group, the
  projected gradient and the FisherSFT factor);
- ``loop``: ``LoopGradStats``, one forward+backward per example (what LESS-style code does), on the
  same examples (the first ``--loop-examples`` of the batch when that is smaller: its cost per token
  does not depend on B);
- ``plain``: one batched training step's forward+backward (summed weight gradients, no optimizer).
and prints examples/s, tokens/s (real tokens, not padding), the engine's speedup over the loop, its
cost relative to the plain step, the achieved FLOP rate (6 · params · padded tokens per pass, the
training bound) against a large matmul measured here, and peak memory against the plain step (CUDA:
allocator peaks; CPU: each pass in a fresh process, peak RSS above the model and batch).

    python benchmarks/grad_stats.py --quick                      # a few CPU minutes
    python benchmarks/grad_stats.py --model qwen0.5b --batches 1,4,16,64 --lengths 512   # on a GPU
    python benchmarks/grad_stats.py --quick --model moe-small        # the MoE rules beside "small" (Llama)

On CUDA, sections follow the main table, each printing the figures so far first, in this order (the
newest questions first): fused, profile, graphs, scorer, determinism, MoE, extrema, chunk, compile, auto batch.
- MoE (``--moe-model``, moe-small by default; ``--no-moe`` skips it): the experts' grouped-matmul path against the padded
  stacks and a plain step at B = 16, T = 512, and the self-check on the GPU;
- profile (``--no-profile`` skips it, chunk and extrema): one engine pass and one plain step at
  ``--profile-at``: kernel launches, host waits, how busy the GPU is, the kernels that take the time,
  and each part of the engine's GPU time (its ``grads_ray.<part>`` profiler ranges); the engine also
  in the job's deterministic mode (``engine_det``: which kernels that mode changes, at what cost);
- determinism: the same batch twice, by default and in the job's deterministic mode: whether the
  engine's columns and a plain step's gradients are the same bits, and the mode's cost (MoE too);
- chunk: the engine at ``chunk_elements`` 2^s for s in ``--chunk-shifts`` (time, peak);
- extrema: the engine with ``extrema`` off against on and a plain step (what forming gradients costs);
- fused: the engine with ``fused_moments`` (one Triton kernel reduces the stacks' per-example blocks
  without writing them) against the formed path and a plain step: time, peak, statistics, self-check;
- graphs: the engine's device pass captured as a CUDA graph and replayed, by default, in the
  deterministic mode and with the fused kernel: whether it captures, whether a replay gives the eager
  pass's bits (on the captured batch and another), and a replay's time against an eager pass's;
- scorer: the job's scorer on ``--scorer-rows`` corpus-like rows, with the defaults, ``fused_moments``,
  ``cuda_graphs`` and both: rows/s each, graphs trusted, how far the numbers move (what a run gains);
- compile (only with ``--compile``, any device: compiling takes a while): the engine with its block
  reduction compiled against eager: speed, compile time, how far the statistics move;
- auto batch (``--no-auto-batch`` skips it): the size ``score.batch_size=auto`` picks for ``--model``
  at T = 512 on this GPU, its peak, and the scorer's rate there against B = 16.

``--sections moe,determinism,...`` runs only those sections (no main table): a retry within a
device's time.

The last line printed is one JSON object with the headline figures.
"""

from __future__ import annotations

import argparse
import json
import platform
import subprocess
import sys
import time

import numpy as np
import torch

MODELS = {  # randomly initialised from configs: nothing is downloaded
    "tiny": dict(arch="llama", hidden_size=64, intermediate_size=176, num_hidden_layers=2, num_attention_heads=4,
                 num_key_value_heads=4, vocab_size=2048),
    "small": dict(arch="llama", hidden_size=256, intermediate_size=688, num_hidden_layers=4, num_attention_heads=4,
                  num_key_value_heads=4, vocab_size=8192),
    # the shapes of Qwen2.5-0.5B (tied embedding, grouped-query attention, q/k/v biases)
    "qwen0.5b": dict(arch="qwen2", hidden_size=896, intermediate_size=4864, num_hidden_layers=24,
                     num_attention_heads=14, num_key_value_heads=2, vocab_size=151936, tie_word_embeddings=True),
    # "small" with Qwen3's per-head q/k norms: the norm rule on (B, T, heads, head_dim), beside Llama's
    "qwen3-small": dict(arch="qwen3", hidden_size=256, intermediate_size=688, num_hidden_layers=4,
                        num_attention_heads=4, num_key_value_heads=4, head_dim=64, vocab_size=8192),
    # Qwen2.5-0.5B's structure (24 layers, tied 151,936-token vocabulary, GQA, q/k/v biases) at width 64: the CPU
    # proxy for counting the work a batch dispatches (a GPU at these shapes is bound by launches, not FLOPs)
    "qwen0.5b-proxy": dict(arch="qwen2", hidden_size=64, intermediate_size=352, num_hidden_layers=24,
                           num_attention_heads=4, num_key_value_heads=2, vocab_size=151936, tie_word_embeddings=True),
    # the shapes of Qwen3-0.6B (tied embedding, GQA 16/8, head_dim 128, q/k norms)
    "qwen3-0.6b": dict(arch="qwen3", hidden_size=1024, intermediate_size=3072, num_hidden_layers=28,
                       num_attention_heads=16, num_key_value_heads=8, head_dim=128, vocab_size=151936,
                       tie_word_embeddings=True),
    # a mixture of experts at "small"'s width: Qwen3-MoE, 16 experts, 4 per token (the experts and router rules)
    "moe-small": dict(arch="qwen3_moe", hidden_size=256, moe_intermediate_size=176, intermediate_size=688,
                      num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=4, head_dim=64,
                      num_experts=16, num_experts_per_tok=4, vocab_size=8192),
    # Qwen3-30B-A3B's layer shape (128 experts, 8 per token, 768 wide, hidden 2048), 8 layers instead of 48
    "qwen3moe-a3b-8l": dict(arch="qwen3_moe", hidden_size=2048, moe_intermediate_size=768, intermediate_size=6144,
                            num_hidden_layers=8, num_attention_heads=32, num_key_value_heads=4, head_dim=128,
                            num_experts=128, num_experts_per_tok=8, vocab_size=151936),
}
IGNORE_INDEX = -100


def build_model(name: str, dtype: torch.dtype, device: str):
    from transformers import AutoModelForCausalLM
    from transformers.models.auto.configuration_auto import CONFIG_MAPPING

    spec = dict(MODELS[name])
    cls = CONFIG_MAPPING[spec.pop("arch")]
    torch.manual_seed(0)
    cfg = cls(max_position_embeddings=4096, **spec)
    return AutoModelForCausalLM.from_config(cfg, dtype=dtype).to(device).eval()


def make_batch(batch: int, length: int, vocab: int, seed: int, device: str):
    """Right-padded rows of random length in [T/2, T]; the first fifth of each row is a masked prompt."""
    rng = np.random.default_rng(seed)
    ids = torch.zeros((batch, length), dtype=torch.long)
    labels = torch.full((batch, length), IGNORE_INDEX, dtype=torch.long)
    mask = torch.zeros((batch, length), dtype=torch.long)
    for i in range(batch):
        n = int(rng.integers(length // 2, length + 1))
        row = torch.as_tensor(rng.integers(0, vocab, n))
        ids[i, :n], mask[i, :n] = row, 1
        labels[i, max(1, n // 5):n] = row[max(1, n // 5):]
    return ids.to(device), labels.to(device), mask.to(device)


def plain_step(model, ids, labels, mask):
    """One training step's forward+backward of the mean response-token loss (summed weight grads)."""
    model.zero_grad(set_to_none=True)
    logits = model(input_ids=ids, attention_mask=mask).logits
    loss = torch.nn.functional.cross_entropy(logits[:, :-1].flatten(0, 1).float(), labels[:, 1:].flatten(),
                                             ignore_index=IGNORE_INDEX)
    loss.backward()


def sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


PEAKS: dict[str, float] = {}  # on CUDA: the last ``timed`` call's peak bytes above what was allocated before


def timed(fn, device: str, repeats: int) -> float:
    """Median seconds of ``repeats`` calls after one warm-up call (on CUDA, the warm-up's peak memory
    above what was allocated before it goes to ``PEAKS["last"]``: the memory goal for free)."""
    if device == "cuda":
        torch.cuda.synchronize()
        base = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
    fn()
    sync(device)
    if device == "cuda":
        PEAKS["last"] = torch.cuda.max_memory_allocated() - base
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        sync(device)
        times.append(time.perf_counter() - t0)
    return float(np.median(times))


def matmul_tflops(device: str, dtype: torch.dtype) -> float:
    n = 8192 if device == "cuda" else 2048
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    t = timed(lambda: a @ b, device, 5 if device == "cuda" else 3)
    return 2 * n**3 / t / 1e12


def engine_kwargs(args) -> dict:
    """The engine as the job builds it on this device (its ``chunk_elements`` follows the device)."""
    extra = {"hold_bytes": int(args.hold_mib * 2**20)} if getattr(args, "hold_mib", None) is not None else {}
    return {"proj_dim": args.proj_dim, "proj_rank": args.proj_rank, "fisher_dim": 64, "fisher_rank": 4, **extra}


def run_pass(which: str, model, batch, args) -> None:
    from grads_ray.gradients.engine import BatchedGradStats

    if which == "plain":
        plain_step(model, *batch)
    else:
        BatchedGradStats(model, **engine_kwargs(args))(*batch)


HOST_SYNC_OPS = ("aten::nonzero", "aten::unique", "aten::_unique", "aten::_unique2", "aten::unique_consecutive",
                 "aten::unique_dim", "aten::item", "aten::_local_scalar_dense", "aten::masked_select",
                 "aten::bincount", "aten::repeat_interleave")
TO_HOST_CALLS = ("cpu", "numpy", "tolist", "item", "__bool__", "__int__", "__float__", "__index__")


def dispatch_counts(which: str, model, batch, args) -> dict:
    """What one pass dispatches (one warm-up pass first), with the engine's GPU default ``hold_bytes``
    unless ``--hold-mib`` says otherwise: aten events in all and top-level (torch's profiler, CPU activity), the ops among them that wait for the device (``HOST_SYNC_OPS``), and
    the tensor-to-host calls (``.cpu()``, ``.item()``, a tensor read as a Python number) seen by a
    torch-function mode. On a GPU each top-level event is at least one kernel launch. The model's own
    forward has a few of both (transformers' mask checks): the plain step's count is that floor."""
    from torch.overrides import TorchFunctionMode
    from torch.profiler import ProfilerActivity, profile

    from grads_ray.gradients.engine import BatchedGradStats

    class ToHost(TorchFunctionMode):
        calls = 0

        def __torch_function__(self, func, types, args=(), kwargs=None):
            if getattr(func, "__name__", "") in TO_HOST_CALLS:
                ToHost.calls += 1
            return func(*args, **(kwargs or {}))

    from grads_ray.gradients.engine import HOLD_BYTES

    kwargs = {"hold_bytes": HOLD_BYTES["cuda"], **engine_kwargs(args)}  # the GPU's stacks: what this count stands for
    engine = BatchedGradStats(model, **kwargs) if which == "engine" else None
    # the job's batches are right-padded and say so (left_padded=False): the mask is not read on the host
    run = (lambda: engine(*batch, left_padded=False)) if engine else (lambda: plain_step(model, *batch))
    run()
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        with ToHost():
            run()
    events = [e for e in prof.events() if e.name.startswith("aten::")]
    top = [e for e in events if e.cpu_parent is None or not e.cpu_parent.name.startswith("aten::")]
    model.zero_grad(set_to_none=True)
    return {"aten_events": len(events), "top_level": len(top),
            "host_sync_ops": sum(e.name in HOST_SYNC_OPS for e in events), "to_host_calls": ToHost.calls}


def dispatch_report(args, device: str) -> dict:
    """Engine against a plain step on the launch-count proxy (``--dispatch-model``, B = 4, T = 64)."""
    model = build_model(args.dispatch_model, getattr(torch, args.dtype), device)
    batch = make_batch(4, 64, model.config.vocab_size, 0, device)
    engine = dispatch_counts("engine", model, batch, args)
    plain = dispatch_counts("plain", model, batch, args)
    out = {"engine": engine, "plain": plain,
           "events_ratio": engine["aten_events"] / plain["aten_events"],
           "top_level_ratio": engine["top_level"] / plain["top_level"]}
    print(f"# dispatch on {args.dispatch_model} B=4 T=64: engine {engine['aten_events']} aten events "
          f"({engine['top_level']} top-level), plain step {plain['aten_events']} ({plain['top_level']}): "
          f"{out['events_ratio']:.2f}x ({out['top_level_ratio']:.2f}x top-level); host-sync ops "
          f"{engine['host_sync_ops']} (plain {plain['host_sync_ops']}), to-host calls {engine['to_host_calls']} "
          f"(plain {plain['to_host_calls']})")
    return out


def dispatch_summary(d: dict) -> dict:
    return {"dispatch_events_ratio": round(d["events_ratio"], 2), "dispatch_top_level_ratio": round(d["top_level_ratio"], 2),
            "engine_aten_events": d["engine"]["aten_events"], "plain_aten_events": d["plain"]["aten_events"],
            "host_sync_ops": d["engine"]["host_sync_ops"], "host_sync_ops_plain": d["plain"]["host_sync_ops"],
            "to_host_calls": d["engine"]["to_host_calls"], "to_host_calls_plain": d["plain"]["to_host_calls"]}


def moe_report(args, device: str, batch: int = 16, length: int = 512) -> dict:
    """A mixture of experts (``--moe-model``) through the engine's two experts paths: the grouped
    matmul (a GPU's, where ``grouped_matmul_fits``) and the padded stacks (forced), against a plain
    step on the same batch: time, peak memory (CUDA), the largest relative difference between the two
    paths' statistics, whether two passes give the same numbers (deterministic), and the start-up
    self-check on this device and dtype."""
    from grads_ray.gradients import experts as moe
    from grads_ray.gradients.engine import BatchedGradStats
    from grads_ray.gradients.selfcheck import build_engine, synthetic_examples

    model = build_model(args.moe_model, getattr(torch, args.dtype), device)
    data = make_batch(batch, length, model.config.vocab_size, 0, device)
    engine = BatchedGradStats(model, **engine_kwargs(args))
    calls, real_mm, real_fits = [], getattr(torch.nn.functional, "grouped_mm", None), moe.grouped_matmul_fits
    if real_mm is not None:
        torch.nn.functional.grouped_mm = lambda *a, **k: calls.append(1) or real_mm(*a, **k)
    try:
        t_grouped = timed(lambda: engine(*data), device, 3)
        peak_grouped, grouped, again = PEAKS.get("last"), engine(*data), engine(*data)
        used = bool(calls)
        moe.grouped_matmul_fits = lambda hidden, module: False
        t_padded = timed(lambda: engine(*data), device, 3)
        padded = engine(*data)
    finally:
        moe.grouped_matmul_fits = real_fits
        if real_mm is not None:
            torch.nn.functional.grouped_mm = real_mm
    t_plain = timed(lambda: plain_step(model, *data), device, 3)
    peak_plain = PEAKS.get("last")
    model.zero_grad(set_to_none=True)
    diff = max(float(np.nanmax(np.abs(grouped.columns[c] - v) / np.maximum(np.abs(v), 1e-30)))
               for c, v in padded.columns.items() if c.startswith(("grad_norm", "loss")))
    same = all(np.array_equal(again.columns[c], v, equal_nan=True) for c, v in grouped.columns.items())
    _, check = build_engine(model, {"engine": "batched", "proj_dim": 64, "fisher_dim": 0},
                            synthetic_examples(model.config.vocab_size, n=4), pad_id=0)
    out = {"moe_model": args.moe_model, "moe_grouped_used": used, "moe_grouped_vs_plain": round(t_grouped / t_plain, 2),
           "moe_padded_vs_plain": round(t_padded / t_plain, 2), "moe_paths_max_rel_diff": float(f"{diff:.2e}"),
           "moe_same_twice": same,
           "moe_self_check": bool(check.passed),
           "moe_self_check_error": None if check.max_rel_error is None else float(f"{check.max_rel_error:.2e}")}
    if peak_grouped is not None:
        out["moe_peak_mem_vs_plain"] = round(peak_grouped / max(peak_plain, 1), 2)
    print(f"# MoE {args.moe_model} B={batch} T={length}: engine {t_grouped:.3f} s ({'grouped_mm' if used else 'padded'})"
          f", padded stacks {t_padded:.3f} s, plain step {t_plain:.3f} s; statistics differ by {diff:.1e} between "
          f"the paths; {'the same' if same else 'NOT the same'} twice; self-check {'passed' if check.passed else 'FAILED: ' + str(check.reason)}")
    return out


def child_memory(args) -> None:
    """In a fresh process: peak RSS (bytes) of one pass above what the model and batch hold."""
    import resource

    torch.set_num_threads(args.threads)
    dtype = getattr(torch, args.dtype)
    model = build_model(args.model, dtype, "cpu")
    batch = make_batch(args.child_batch, args.child_length, model.config.vocab_size, 0, "cpu")
    with open("/proc/self/statm") as f:
        base = int(f.read().split()[1]) * resource.getpagesize()
    run_pass(args.child, model, batch, args)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    print(json.dumps({"peak_extra": peak - base}))


LAUNCHES = ("cudaLaunchKernel", "cudaLaunchKernelExC", "cuLaunchKernel", "cuLaunchKernelEx")
SYNCS = ("cudaStreamSynchronize", "cudaDeviceSynchronize", "cudaEventSynchronize", "cudaMemcpy")


def device_profile(model, data, args, device: str, top: int = 12) -> dict:
    """What the device does in one engine pass and one plain step (CUDA; one warm-up each first), from
    torch's profiler: kernels launched, host waits (synchronize calls and blocking copies), the
    kernels' summed time against the pass's wall time (a launch-bound pass keeps the GPU idle between
    small kernels: busy well under 1), the kernels that take the most time, and the time of each part
    of the engine (its ``grads_ray.<part>`` ranges: device time on CUDA, host time on a CPU). On a CPU
    the counts are 0 (only the wall times mean something): the code path is testable here."""
    from torch.profiler import ProfilerActivity, profile

    from grads_ray.determinism import deterministic
    from grads_ray.gradients import fused
    from grads_ray.gradients.engine import BatchedGradStats
    from grads_ray.gradients.profiling import PREFIX

    engine = BatchedGradStats(model, **engine_kwargs(args))

    def engine_det():  # the job's mode (deterministic=true, the default): which kernels it changes, and their cost
        with deterministic(True):
            engine(*data)

    runs = {"engine": lambda: engine(*data), "engine_det": engine_det, "plain": lambda: plain_step(model, *data)}
    if fused.usable(next(model.parameters())):  # the candidate GPU default: the job's mode with the fused kernel
        engine_on = BatchedGradStats(model, **engine_kwargs(args), fused_moments=True)

        def engine_fused():
            with deterministic(True):
                engine_on(*data)

        runs["engine_fused"] = engine_fused
    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device == "cuda" else [])
    out: dict = {}
    for which, fn in runs.items():
        fn()
        sync(device)
        with profile(activities=acts) as prof:
            t0 = time.perf_counter()
            fn()
            sync(device)
            wall = time.perf_counter() - t0
        model.zero_grad(set_to_none=True)
        stats = prof.key_averages()
        count = {e.key: e.count for e in stats}
        on_device = [e for e in stats if str(getattr(e, "device_type", "")).endswith("CUDA")]
        kernels = [e for e in on_device if not e.key.startswith(PREFIX)]  # not the parts' spans on the GPU
        parts = {e.key[len(PREFIX):]: (getattr(e, "device_time_total", 0) / 1e3, e.cpu_time_total / 1e3, e.count)
                 for e in stats if e.key.startswith(PREFIX) and e not in on_device}
        busy_us = sum(getattr(e, "self_device_time_total", getattr(e, "self_cuda_time_total", 0)) for e in kernels)
        if device == "cuda" and not kernels:
            print("# profile: no kernel events on CUDA (is CUPTI missing?): the counts below are not the GPU's")
        out[which] = {"launches": sum(count.get(k, 0) for k in LAUNCHES), "kernels": sum(e.count for e in kernels),
                      "syncs": sum(count.get(k, 0) for k in SYNCS), "wall_ms": wall * 1e3,
                      "kernel_ms": busy_us / 1e3, "busy": busy_us / 1e6 / wall,
                      "top": sorted(((getattr(e, "self_device_time_total", getattr(e, "self_cuda_time_total", 0)) / 1e3,
                                      e.count, e.key[:110]) for e in kernels), reverse=True)[:top],
                      "parts": parts}
    for which, got in out.items():
        print(f"# profile {which}: {got['launches']} launches, {got['kernels']} kernels (copies and fills "
              f"included), {got['syncs']} host waits, kernels "
              f"{got['kernel_ms']:.1f} ms of {got['wall_ms']:.1f} ms wall (busy {got['busy']:.0%})", flush=True)
        for ms, n, name in got["top"]:
            print(f"#   {ms:9.2f} ms {n:6d}x  {name}")
    for which in ("engine", "engine_fused"):  # grads_ray.<part> ranges (gradients/profiling.py); backward holds
        if out.get(which, {}).get("parts"):  # the hooks' parts
            print(f"# {which} parts, device ms / host ms (calls): " + ", ".join(
                f"{k} {d:.1f} / {h:.1f} ({n})" for k, (d, h, n) in sorted(out[which]["parts"].items(),
                                                                           key=lambda kv: -kv[1][0] - kv[1][1])))
    e, p, d = out["engine"], out["plain"], out["engine_det"]
    f = out.get("engine_fused")
    fused_keys = {"profile_wall_ms_engine_fused": round(f["wall_ms"], 1), "profile_kernel_ms_engine_fused":
                  round(f["kernel_ms"], 1), "profile_busy_engine_fused": round(f["busy"], 3),
                  "profile_launches_engine_fused": f["launches"]} if f else {}
    return {"profile_launches_engine": e["launches"], "profile_launches_plain": p["launches"],
            "profile_kernel_ms_engine_det": round(d["kernel_ms"], 1), "profile_wall_ms_engine_det": round(d["wall_ms"], 1),
            "profile_wall_ms_engine": round(e["wall_ms"], 1), "profile_wall_ms_plain": round(p["wall_ms"], 1),
            "profile_launches_ratio": round(e["launches"] / max(p["launches"], 1), 2),
            "profile_kernels_engine": e["kernels"], "profile_kernels_plain": p["kernels"],
            "profile_host_waits_engine": e["syncs"], "profile_host_waits_plain": p["syncs"],
            "profile_busy_engine": round(e["busy"], 3), "profile_busy_plain": round(p["busy"], 3),
            "profile_kernel_ms_engine": round(e["kernel_ms"], 1), "profile_kernel_ms_plain": round(p["kernel_ms"], 1),
            **{f"profile_part_{k}_ms": round(d if device == "cuda" else h, 1) for k, (d, h, _) in e["parts"].items()},
            **fused_keys}


def extrema_report(model, data, args, device: str) -> dict:
    """The engine with ``extrema`` off (``score.extrema=false``: no grad_max/grad_min, so no weight's
    per-example gradient is formed where the ghost norm is cheaper) against the default and a plain
    step on one batch: how much of the engine's cost is forming the gradients for their extrema."""
    from grads_ray.gradients.engine import BatchedGradStats

    on = BatchedGradStats(model, **engine_kwargs(args))
    off = BatchedGradStats(model, **engine_kwargs(args), extrema=False)
    t_on = timed(lambda: on(*data), device, 3)
    t_off = timed(lambda: off(*data), device, 3)
    t_plain = timed(lambda: plain_step(model, *data), device, 3)
    model.zero_grad(set_to_none=True)
    out = {"extrema_on_vs_plain": round(t_on / t_plain, 2), "extrema_off_vs_plain": round(t_off / t_plain, 2)}
    print(f"# extrema: on {t_on * 1e3:.1f} ms ({out['extrema_on_vs_plain']}x a plain step), off {t_off * 1e3:.1f} ms "
          f"({out['extrema_off_vs_plain']}x), plain step {t_plain * 1e3:.1f} ms", flush=True)
    return out


def fused_report(model, data, args, device: str) -> dict:
    """The engine with ``fused_moments`` (the stacks' per-example blocks reduced by one Triton kernel
    that never writes them, ``gradients/fused.py``) against the formed path and a plain step on one
    batch: time, peak, how far the statistics move (the formed path rounds each entry to the model's
    dtype first), and the self-check with the kernel on (a CUDA device, or a CPU under Triton's interpreter)."""
    from grads_ray.gradients import fused
    from grads_ray.gradients.engine import BatchedGradStats
    from grads_ray.gradients.selfcheck import build_engine, synthetic_examples

    if not fused.usable(next(model.parameters())):
        print(f"# fused: the kernel does not run here ({device}, {args.dtype}; triton importable: "
              f"{_importable('triton')})", flush=True)
        return {"fused_usable": False}
    default_tiles = (fused.BLOCK_M, fused.BLOCK_N, fused.BLOCK_K, fused.NUM_WARPS, fused.NUM_STAGES)
    on = BatchedGradStats(model, **engine_kwargs(args), fused_moments=True)
    off = BatchedGradStats(model, **engine_kwargs(args))
    t0 = time.perf_counter()
    a = on(*data)
    sync(device)
    first_s = time.perf_counter() - t0  # the kernel's compile included
    b = off(*data)
    names, worst = column_differences(a.columns, b.columns)
    t_on = timed(lambda: on(*data), device, 5)
    peak_on = PEAKS.get("last")
    t_off = timed(lambda: off(*data), device, 5)
    peak_off = PEAKS.get("last")
    t_plain = timed(lambda: plain_step(model, *data), device, 5)
    model.zero_grad(set_to_none=True)
    _, check = build_engine(model, {"engine": "auto", "proj_dim": 64, "fisher_dim": 0, "fused_moments": True},
                            synthetic_examples(model.config.vocab_size, n=4), pad_id=0)
    tiles = {}
    for spec in filter(None, (args.fused_tiles or "").split(";")):  # other tile shapes: m,n,k,warps,stages
        shape = tuple(int(v) for v in spec.split(","))
        fused.set_tiles(*shape)
        try:
            on(*data)  # its compile
            tiles[spec] = round(timed(lambda: on(*data), device, 5) * 1e3, 1)
        except Exception as exc:  # noqa: BLE001 - a shape this GPU cannot take (shared memory): say so
            tiles[spec] = f"{type(exc).__name__}: {str(exc).splitlines()[0][:120] if str(exc) else ''}"
        print(f"# fused tiles {spec}: {tiles[spec]}{' ms a pass' if isinstance(tiles[spec], float) else ''}", flush=True)
    if tiles:
        fused.set_tiles(*default_tiles)
    out = {"fused_usable": True, "fused_first_pass_s": round(first_s, 2), "fused_ms": round(t_on * 1e3, 1),
           **({"fused_tiles_ms": tiles} if tiles else {}),
           "formed_ms": round(t_off * 1e3, 1), "fused_speedup": round(t_off / t_on, 3),
           "fused_vs_plain": round(t_on / t_plain, 3), "formed_vs_plain": round(t_off / t_plain, 3),
           "fused_max_rel_diff": float(f"{worst:.2e}"), "fused_self_check_passed": bool(check.passed),
           **({"fused_peak_vs_formed": round(peak_on / max(peak_off, 1), 3)} if peak_on and peak_off else {})}
    print(f"# fused: {t_on * 1e3:.1f} ms a pass against {t_off * 1e3:.1f} ms formed ({out['fused_speedup']}x), "
          f"{out['fused_vs_plain']}x a plain step ({t_plain * 1e3:.1f} ms); first pass {first_s:.1f} s; statistics "
          f"differ by up to {worst:.1e} ({len(names)} columns); self-check "
          f"{'passed' if check.passed else 'FAILED: ' + str(check.reason)[:200]}", flush=True)
    return out


def _importable(name: str) -> bool:
    import importlib.util

    return importlib.util.find_spec(name) is not None


def chunk_report(model, data, args, device: str) -> dict:
    """The engine at ``score.chunk_elements`` 2^s for each s of ``--chunk-shifts`` (the largest block
    of formed gradient entries; ``auto`` is 2^28 on a GPU, 2^26 on a CPU) on one batch: time and (CUDA)
    peak memory each.
    Larger blocks mean fewer of them (fewer launches) and more memory: what a GPU default should be."""
    from grads_ray.gradients.engine import BatchedGradStats

    out = {}
    for shift in (int(x) for x in args.chunk_shifts.split(",")):
        engine = BatchedGradStats(model, **{**engine_kwargs(args), "chunk_elements": 1 << shift})
        t = timed(lambda e=engine: e(*data), device, 3)
        out[f"chunk_2e{shift}_ms"] = round(t * 1e3, 1)
        if PEAKS.get("last") is not None and device == "cuda":
            out[f"chunk_2e{shift}_peak_mib"] = round(PEAKS["last"] / 2**20)
        print(f"# chunk_elements 2^{shift}: {t * 1e3:.1f} ms a pass"
              + (f", peak {PEAKS['last'] / 2**20:.0f} MiB" if device == "cuda" else ""), flush=True)
    return out


def column_differences(a: dict, b: dict) -> tuple[list[str], float]:
    """The columns of two results that are not bit-identical, and the largest relative difference."""
    names, worst = [], 0.0
    for k, v in a.items():
        x, y = np.asarray(v, np.float64), np.asarray(b[k], np.float64)
        if not np.array_equal(x, y, equal_nan=True):
            names.append(k)
            ok = np.isfinite(x) & np.isfinite(y) & (x != 0)
            if ok.any():
                worst = max(worst, float(np.max(np.abs(x[ok] - y[ok]) / np.abs(x[ok]))))
    return names, worst


def determinism_report(model, data, args, device: str, prefix: str = "det") -> dict:
    """Whether the same batch twice gives the same bits (a run must be deterministic for its seed): the
    engine's columns, and a plain step's weight gradients (the model's own backward: attention,
    embedding), first as torch runs by default, then in the job's deterministic mode
    (``grads_ray.determinism.deterministic``: ``deterministic=true``, the default), with that mode's
    cost in engine time and any warnings about non-deterministic kernels; ``--det-attention`` adds
    the mode with one attention kernel alone. The first few differing columns and parameters are
    printed."""
    import warnings

    from grads_ray.gradients.engine import BatchedGradStats

    engine = BatchedGradStats(model, **engine_kwargs(args))

    def grads() -> dict:
        plain_step(model, *data)
        out = {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.grad is not None}
        model.zero_grad(set_to_none=True)
        return out

    def trial(tag: str) -> dict:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            first, second = engine(*data).columns, engine(*data).columns
            g1, g2 = grads(), grads()
            seconds = timed(lambda: engine(*data), device, 3)
        names, worst = column_differences(first, second)
        norms = column_differences({k: v for k, v in first.items() if k.endswith("grad_norm")}, second)[1]
        params = [n for n in g1 if not torch.equal(g1[n], g2[n])]
        ops = sorted({str(w.message).split(" does not have a deterministic")[0][:80] for w in caught
                      if "deterministic" in str(w.message)})
        print(f"# {prefix} {tag}: engine {'the same' if not names else f'NOT the same ({len(names)} columns, up to {worst:.1e})'}"
              f" twice (norms up to {norms:.1e}); plain-step gradients {'the same' if not params else f'NOT the same ({len(params)} parameters)'}"
              f"; {seconds * 1e3:.1f} ms a pass" + (f"; warned: {ops}" if ops else ""), flush=True)
        for n in names[:6] + params[:6]:
            print(f"#   differs: {n}")
        return {f"{prefix}_{tag}_engine_same": not names, f"{prefix}_{tag}_engine_columns_differ": len(names),
                f"{prefix}_{tag}_engine_max_rel_diff": float(f"{worst:.2e}"),
                f"{prefix}_{tag}_norm_max_rel_diff": float(f"{norms:.2e}"), f"{prefix}_{tag}_plain_grads_same": not params,
                f"{prefix}_{tag}_plain_params_differ": len(params), f"{prefix}_{tag}_ms": round(seconds * 1e3, 1),
                **({f"{prefix}_{tag}_warned": ops[:5]} if ops else {})}

    from torch.nn.attention import SDPBackend, sdpa_kernel

    from grads_ray.determinism import deterministic

    out = trial("default")
    with deterministic(True):  # the job's mode (deterministic=true): what the scorer and training loops run in
        out.update(trial("deterministic"))
        for name in filter(None, (args.det_attention or "").split(",")):  # one attention kernel, deterministic mode
            try:
                with sdpa_kernel([getattr(SDPBackend, {"flash": "FLASH_ATTENTION", "efficient": "EFFICIENT_ATTENTION",
                                                       "math": "MATH", "cudnn": "CUDNN_ATTENTION"}[name])]):
                    out.update(trial(f"sdpa_{name}"))
            except RuntimeError as exc:  # this kernel cannot take these inputs here (a CPU has no efficient one)
                out[f"{prefix}_sdpa_{name}_error"] = str(exc).splitlines()[0][:200]
                print(f"# {prefix} sdpa_{name}: {out[f'{prefix}_sdpa_{name}_error']}", flush=True)
    out[f"{prefix}_mode_cost"] = round(out[f"{prefix}_deterministic_ms"] / out[f"{prefix}_default_ms"], 3)
    return out


def graphs_report(model, data, args, device: str) -> dict:
    """The engine's device pass (``BatchedGradStats.device_pass``) captured once as a CUDA graph and
    replayed: whether the capture works (nothing in the pass may wait for the device; transformers
    skips its own mask checks while a stream captures), whether a replay gives the eager pass's bits on
    the captured batch and on another batch of the same shape (a value baked into the graph would
    show there), and a replay's time (inputs copied in, results to the host) against an eager pass's.
    In torch's default mode, then in the job's deterministic mode, then deterministic with
    ``score.fused_moments`` (its Triton kernel in the graph) where the kernel runs. What CUDA graphs per
    (B, T) bucket would save, measured before the job uses them. CUDA only."""
    from grads_ray.determinism import deterministic
    from grads_ray.gradients import fused
    from grads_ray.gradients.engine import BatchedGradStats

    other = make_batch(data[0].shape[0], data[0].shape[1], model.config.vocab_size, 99, device)
    out: dict = {}
    trials = [("default", False, False), ("deterministic", True, False)]
    if fused.usable(next(model.parameters())):
        trials.append(("fused", True, True))
    for tag, det, on in trials:
        engine = BatchedGradStats(model, **engine_kwargs(args), fused_moments=on)
        with deterministic(det):
            out.update(graph_trial(engine, data, other, tag))
        del engine
        if not out[f"graphs_{tag}_captured"]:  # a torch before 2.12 is left mid-capture by a failed one
            break  # (pytorch#180395): no other capture, no empty_cache
        torch.cuda.empty_cache()
    return out


def graph_trial(engine, data, other, tag: str) -> dict:
    """One capture of ``engine``'s device pass on ``data``'s shape and its replays (``graphs_report``)."""
    from grads_ray.gradients.graphs import CudaGraphs
    from grads_ray.gradients.reduce import to_host

    def eager(batch):
        return to_host(engine.device_pass(*batch, left_padded=False))

    want = [eager(data), eager(other)]
    static = [t.clone() for t in data]
    try:  # as the scorer captures (score.cuda_graphs): a warm-up pass on a side stream, then the capture
        t0 = time.perf_counter()
        graph, pieces = CudaGraphs().capture(lambda: engine.device_pass(*static, left_padded=False))
        torch.cuda.synchronize()
        capture_s = time.perf_counter() - t0
    except Exception as exc:  # noqa: BLE001 - what stops a capture is the finding
        line = f"{type(exc).__name__}: {str(exc).splitlines()[0][:200] if str(exc) else ''}"
        print(f"# graphs {tag}: capture failed: {line}", flush=True)
        return {f"graphs_{tag}_captured": False, f"graphs_{tag}_error": line}

    def replay(batch):
        for s, t in zip(static, batch, strict=True):
            s.copy_(t)
        graph.replay()
        return to_host(pieces)

    diffs = [column_differences(replay(b), w) for b, w in zip((data, other), want, strict=True)]
    t_eager = timed(lambda: eager(data), "cuda", 5)
    t_graph = timed(lambda: replay(data), "cuda", 5)
    same = [not names for names, _ in diffs]
    print(f"# graphs {tag}: captured in {capture_s:.2f} s (a warm-up pass included); replay vs eager: captured batch "
          f"{'the same bits' if same[0] else f'differs (up to {diffs[0][1]:.1e})'}, another batch "
          f"{'the same bits' if same[1] else f'differs (up to {diffs[1][1]:.1e})'}; eager {t_eager * 1e3:.1f} ms, "
          f"replay {t_graph * 1e3:.1f} ms: {t_eager / t_graph:.2f}x", flush=True)
    return {f"graphs_{tag}_captured": True, f"graphs_{tag}_capture_s": round(capture_s, 2),
            f"graphs_{tag}_same_captured_batch": same[0], f"graphs_{tag}_same_other_batch": same[1],
            f"graphs_{tag}_max_rel_diff": float(f"{max(d for _, d in diffs):.2e}"),
            f"graphs_{tag}_eager_ms": round(t_eager * 1e3, 1), f"graphs_{tag}_replay_ms": round(t_graph * 1e3, 1),
            f"graphs_{tag}_speedup": round(t_eager / t_graph, 3)}


def compile_report(model, data, args, device: str) -> dict:
    """The engine with its block reduction (``factored.block_moments``: row norms, max, min of each
    formed block) compiled by ``torch.compile(dynamic=True)`` against the eager one, on one batch:
    the first compiled pass's time (compilation), the passes' median time after it, and the largest
    relative difference of any statistic (a compiled reduction sums in another order)."""
    from grads_ray.gradients import factored
    from grads_ray.gradients.engine import BatchedGradStats

    engine = BatchedGradStats(model, **engine_kwargs(args))
    eager_fn = factored.block_moments
    eager = engine(*data)
    t_eager = timed(lambda: engine(*data), device, 3)
    try:
        factored.block_moments = torch.compile(eager_fn, dynamic=True)
        t0 = time.perf_counter()
        compiled = engine(*data)
        sync(device)
        first = time.perf_counter() - t0
        t_compiled = timed(lambda: engine(*data), device, 3)
    finally:
        factored.block_moments = eager_fn
    worst = 0.0
    for k, v in eager.columns.items():
        a, b = np.asarray(v, np.float64), np.asarray(compiled.columns[k], np.float64)
        ok = np.isfinite(a) & (a != 0)
        if ok.any():
            worst = max(worst, float(np.max(np.abs(a[ok] - b[ok]) / np.abs(a[ok]))))
    out = {"compile_first_pass_s": round(first, 1), "compile_vs_eager": round(t_eager / t_compiled, 3),
           "compile_max_rel_diff": worst}
    print(f"# block reduction compiled: {out['compile_vs_eager']}x eager's speed ({t_compiled * 1e3:.1f} against "
          f"{t_eager * 1e3:.1f} ms a pass; first pass {first:.1f} s); statistics differ by up to {worst:.1e}", flush=True)
    return out


def auto_batch_report(args, length: int) -> dict:
    """``score.batch_size=auto`` on this GPU (CUDA only): ``--model`` saved to a folder and loaded
    by the job's scorer, the batch size measured as the score stage measures it (``gradients/
    batch_size.py``, rows of ``length`` tokens), then the scorer's rate at that size and at 16 on
    the same widest rows (examples/s, engine only)."""
    import gc
    import shutil
    import tempfile

    from grads_ray.data.batching import pad_batch
    from grads_ray.gradients.batch_size import describe, measure, worst_rows

    folder = tempfile.mkdtemp(prefix="grads-auto-")
    try:
        build_model(args.model, getattr(torch, args.dtype), "cpu").save_pretrained(folder)
        settings = {"dtype": args.dtype, "proj_dim": args.proj_dim, "proj_rank": args.proj_rank}
        t0 = time.perf_counter()
        found = measure(folder, settings=settings, max_length=length)
        took = time.perf_counter() - t0
        if "error" in found:
            return {"auto_batch_error": found["error"][:300]}
        print(f"# {describe(found)}; measured in {took:.1f} s (model load and self-check included)", flush=True)
        out = {"auto_batch": found["batch_size"], "auto_batch_seconds": round(took, 1)}
        if "reason" in found:  # not measured (the loop)
            return {**out, "auto_batch_reason": found["reason"][:300]}
        fit = next(t for t in found["trace"] if t["rows"] == found["batch_size"])
        out.update(auto_batch_peak_gib=round(fit["peak"] / 2**30, 2), auto_batch_budget_gib=round(found["budget"] / 2**30, 2))
        gc.collect()  # the measuring scorer's model, before a second one loads
        torch.cuda.empty_cache()
        from grads_ray.gradients.scorer import Scorer

        scorer = Scorer(folder, use_gpu=True, settings=settings, batch_size=found["batch_size"])
        vocab = scorer.model.get_input_embeddings().num_embeddings
        for b, key in ((found["batch_size"], "auto_batch_examples_per_s"), (16, "b16_full_rows_examples_per_s")):
            data = tuple(t.to(scorer.device) for t in pad_batch(*worst_rows(vocab, b, found["length"]), scorer.pad_id))
            try:
                out[key] = round(b / timed(lambda d=data: scorer.score_padded(*d), scorer.device.type, 3), 2)
            except torch.OutOfMemoryError:  # 16 over what auto found fits: that is the answer
                out[key] = None
            print(f"# scorer at B={b}: {out[key]} ex/s (rows of {found['length']} tokens)", flush=True)
        return out
    finally:
        shutil.rmtree(folder, ignore_errors=True)


def corpus_unit(n: int, length: int, vocab: int, seed: int = 0) -> dict:
    """A scorer's unit of ``n`` corpus-like rows (lengths uniform in [T/2, T], the first fifth a prompt)."""
    rng = np.random.default_rng(seed)
    rows = [rng.integers(0, vocab, size=int(k)) for k in rng.integers(length // 2, length + 1, n)]
    return {"id": np.array([f"r{i}" for i in range(n)], dtype=object), "shard": np.zeros(n, np.int64),
            "source": np.array(["bench"] * n, dtype=object), "line": np.arange(n), "pos": np.arange(n),
            "input_ids": rows, "labels": [np.where(np.arange(len(r)) < len(r) // 5, IGNORE_INDEX, r) for r in rows],
            "reason": np.array([""] * n, dtype=object), "detail": np.array([""] * n, dtype=object),
            "truncated": np.zeros(n, dtype=bool)}


def scorer_report(args, length: int, device: str) -> dict:
    """The job's scorer (``gradients/scorer.py``: ``--model`` saved and loaded, its self-check, length-
    sorted batches of 16) on ``--scorer-rows`` corpus-like rows of up to ``length`` tokens, four ways: the
    engine's defaults, ``score.fused_moments``, ``score.cuda_graphs`` and both. Rows/s of each on its
    second call over the rows (the first compiles and captures), the graphs' shapes trusted and refused,
    and how far each way's numbers are from the defaults' (loss and gradient norm, largest relative
    difference). What the job gains from each; on a CPU only the code path (no graphs, no kernel)."""
    import gc
    import shutil
    import tempfile

    from grads_ray.gradients.scorer import Scorer

    folder = tempfile.mkdtemp(prefix="grads-scorer-")
    out: dict = {}
    try:
        build_model(args.model, getattr(torch, args.dtype), "cpu").save_pretrained(folder)
        base, unit = None, None
        for tag, extra in (("eager", {}), ("fused", {"fused_moments": True}), ("graphs", {"cuda_graphs": True}),
                           ("fused_graphs", {"fused_moments": True, "cuda_graphs": True})):
            settings = {"dtype": args.dtype, "proj_dim": args.proj_dim, "proj_rank": args.proj_rank, **extra}
            scorer = Scorer(folder, use_gpu=device == "cuda", settings=settings, batch_size=16,
                            unit_rows=args.scorer_rows)
            if unit is None:
                unit = corpus_unit(args.scorer_rows, length, scorer.model.get_input_embeddings().num_embeddings)
            scorer(unit)  # compiles, captures
            sync(device)
            t0 = time.perf_counter()
            got = scorer(unit)
            sync(device)
            rate = args.scorer_rows / (time.perf_counter() - t0)
            out[f"scorer_{tag}_rows_per_s"] = round(rate, 2)
            line = f"# scorer {tag}: {rate:.2f} rows/s"
            if scorer.graphs is not None:
                shapes = scorer.graphs.summary()
                trusted = sum(v["trusted"] for v in shapes.values())
                refused = sorted({v["refused"] for v in shapes.values() if v.get("refused")})
                out[f"scorer_{tag}_shapes_trusted"] = trusted
                out[f"scorer_{tag}_shapes"] = len(shapes)
                if refused:
                    out[f"scorer_{tag}_refused"] = refused[0][:200]
                line += f"; graphs: {trusted} of {len(shapes)} shapes trusted" + (f" ({refused[0][:160]})" if refused else "")
            if base is None:
                base = got
            else:
                _, worst = column_differences({k: got[k] for k in ("loss", "grad_norm")},
                                              {k: base[k] for k in ("loss", "grad_norm")})
                out[f"scorer_{tag}_max_rel_diff"] = float(f"{worst:.2e}")
                out[f"scorer_{tag}_vs_eager"] = round(rate / out["scorer_eager_rows_per_s"], 3)
                line += f"; {out[f'scorer_{tag}_vs_eager']}x the defaults, loss and norms within {worst:.1e}"
            print(line, flush=True)
            failed = scorer.graphs is not None and scorer.graphs.off.startswith("a capture failed")
            del scorer
            gc.collect()
            if failed:  # a torch before 2.12 is left mid-capture (pytorch#180395): no empty_cache, no more
                break
            if device == "cuda":
                torch.cuda.empty_cache()
        return out
    finally:
        shutil.rmtree(folder, ignore_errors=True)


def memory_ratio(args, batch: int, length: int, device: str, model=None) -> dict:
    """Peak memory of the engine and of the plain step above the model and batch."""
    if device == "cuda":
        out = {}
        data = make_batch(batch, length, model.config.vocab_size, 0, device)
        for which in ("plain", "engine"):
            torch.cuda.synchronize()
            torch.cuda.empty_cache()
            base = torch.cuda.memory_allocated()
            torch.cuda.reset_peak_memory_stats()
            run_pass(which, model, data, args)
            torch.cuda.synchronize()
            out[which] = torch.cuda.max_memory_allocated() - base
            model.zero_grad(set_to_none=True)
    else:
        out = {}
        for which in ("plain", "engine"):  # median of three fresh processes: RSS peaks are noisy
            cmd = [sys.executable, __file__, "--child", which, "--child-batch", str(batch), "--child-length",
                   str(length), "--model", args.model, "--dtype", args.dtype, "--threads", str(args.threads),
                   "--proj-dim", str(args.proj_dim), "--proj-rank", str(args.proj_rank)] + (
                       ["--hold-mib", str(args.hold_mib)] if args.hold_mib is not None else [])
            peaks = []
            for _ in range(3):
                res = subprocess.run(cmd, capture_output=True, text=True, check=True)
                peaks.append(json.loads(res.stdout.strip().splitlines()[-1])["peak_extra"])
            out[which] = float(np.median(peaks))
    return {"plain_mib": out["plain"] / 2**20, "engine_mib": out["engine"] / 2**20,
            "ratio": out["engine"] / max(out["plain"], 1)}


def only(args, device: str) -> None:
    """One method, ``--passes`` times, on one batch: whole-process time and peak memory are then the
    method's (plus the same fixed start-up for every method)."""
    from grads_ray.gradients.engine import BatchedGradStats
    from grads_ray.gradients.stats import LoopGradStats

    torch.set_num_threads(args.threads)
    dtype = getattr(torch, "bfloat16" if args.dtype == "auto" and device == "cuda" else
                    ("float32" if args.dtype == "auto" else args.dtype))
    model = build_model(args.model, dtype, device)
    batch, length = int((args.batches or "16").split(",")[0]), int((args.lengths or "512").split(",")[0])
    data = make_batch(batch, length, model.config.vocab_size, 0, device)
    run = {"engine": BatchedGradStats(model, **engine_kwargs(args)), "loop": LoopGradStats(model, **engine_kwargs(args)),
           "plain": lambda *d: plain_step(model, *d)}[args.only]
    for _ in range(args.passes):
        run(*data)
    sync(device)


def section(summary: dict, key: str, run) -> None:
    """One of the sections after the main table: the figures so far printed first (so a time limit
    cannot take them), then ``run()``'s keys added to ``summary``, or ``<key>_error`` saying what broke."""
    print(json.dumps(summary), flush=True)
    try:
        summary.update(run())
    except Exception as exc:  # noqa: BLE001 - the main figures stand; say what broke
        summary[f"{key}_error"] = f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"[:300]
        print(f"# {key} section failed: {summary[f'{key}_error']}", flush=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="a few CPU minutes: small model, short grid")
    ap.add_argument("--model", default=None, choices=sorted(MODELS))
    ap.add_argument("--device", default="auto")
    ap.add_argument("--dtype", default="auto", help="auto: bfloat16 on CUDA, float32 on CPU")
    ap.add_argument("--batches", default=None, help="comma-separated batch sizes")
    ap.add_argument("--lengths", default=None, help="comma-separated sequence lengths")
    ap.add_argument("--loop-examples", type=int, default=None, help="examples timed in the loop (cap)")
    ap.add_argument("--repeats", type=int, default=None)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--proj-dim", type=int, default=512)
    ap.add_argument("--proj-rank", type=int, default=8)
    ap.add_argument("--hold-mib", type=float, default=None, help="the engine's hold_bytes in MiB (default: its own)")
    ap.add_argument("--memory-at", default="16,512", help="B,T of the memory comparison ('' to skip)")
    ap.add_argument("--only", default=None, choices=["engine", "loop", "plain"],
                    help="run just this method --passes times on one batch (--batches, --lengths: first "
                         "values) and print nothing: for timing whole processes against each other")
    ap.add_argument("--passes", type=int, default=3)
    ap.add_argument("--dispatch-model", default="qwen0.5b-proxy", choices=sorted(MODELS),
                    help="model of the dispatch count (aten events, host syncs)")
    ap.add_argument("--no-dispatch", action="store_true", help="skip the dispatch count")
    ap.add_argument("--moe-model", default=None, choices=sorted(MODELS),
                    help="a MoE model timed through both experts paths (default on CUDA: moe-small)")
    ap.add_argument("--moe-at", default="16,512", help="B,T of the MoE section")
    ap.add_argument("--no-moe", action="store_true", help="skip the MoE section on CUDA (unless --moe-model names one)")
    ap.add_argument("--dispatch-only", action="store_true", help="print the dispatch count and stop")
    ap.add_argument("--no-profile", action="store_true",
                    help="skip the CUDA profile of one engine pass and one plain step, the chunk_elements sweep "
                         "and the extrema section")
    ap.add_argument("--profile", action="store_true", help="run the profile section on a CPU too (its code path)")
    ap.add_argument("--profile-at", default="16,512", help="B,T of the profile section (and of --compile)")
    ap.add_argument("--chunk-shifts", default="26,27,28", help="the chunk section's chunk_elements, as powers of 2")
    ap.add_argument("--det-attention", default=None,
                    help="the determinism section also tries these attention kernels alone (flash, efficient, math, cudnn)")
    ap.add_argument("--fused-tiles", default="128,128,32,8,3;128,256,64,8,3;64,128,64,4,4",
                    help="the fused section also times these tile shapes: m,n,k,warps,stages separated by ';' "
                         "('' for none)")
    ap.add_argument("--sections", default=None,
                    help="run only these sections (comma-separated: moe, determinism, profile, chunk, extrema, "
                         "fused, graphs, scorer, compile, auto_batch), without the main table")
    ap.add_argument("--scorer-rows", type=int, default=320, help="rows of the scorer section (batches of 16)")
    ap.add_argument("--compile", action="store_true",
                    help="also time the engine with its block reduction compiled (torch.compile), against eager")
    ap.add_argument("--no-auto-batch", action="store_true",
                    help="skip the CUDA section on score.batch_size=auto (its size, peak and rate)")
    ap.add_argument("--child", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--child-batch", type=int, default=0, help=argparse.SUPPRESS)
    ap.add_argument("--child-length", type=int, default=0, help=argparse.SUPPRESS)
    args = ap.parse_args()
    device = ("cuda" if torch.cuda.is_available() else "cpu") if args.device == "auto" else args.device
    if args.dtype == "auto":
        args.dtype = "bfloat16" if device == "cuda" else "float32"
    args.model = args.model or ("small" if device == "cpu" else "qwen0.5b")
    if args.child:
        return child_memory(args)
    if args.only:
        return only(args, device)
    from grads_ray.gradients.engine import BatchedGradStats
    from grads_ray.gradients.stats import LoopGradStats

    torch.set_num_threads(args.threads)
    if args.dispatch_only:
        d = dispatch_report(args, device)
        print(json.dumps(dispatch_summary(d)))
        return
    quick = args.quick
    batches = [int(x) for x in (args.batches or ("1,4,16" if quick else "1,4,16,64")).split(",")]
    lengths = [int(x) for x in (args.lengths or ("128,512" if quick else "128,512,2048")).split(",")]
    # the loop's rate per token does not depend on B: 4 examples on a GPU (16 there took 107 s of the
    # device check's 170 at 0.6 examples/s, so no row came back on 2026-12-04)
    loop_cap = args.loop_examples or (4 if quick or device == "cuda" else 16)
    repeats = args.repeats or 3
    dtype = getattr(torch, args.dtype)
    cuda = device == "cuda"
    default = {"moe": (cuda and not args.no_moe) or args.moe_model is not None, "determinism": cuda, "profile": (cuda and not args.no_profile) or args.profile,
               "chunk": cuda and not args.no_profile, "extrema": cuda and not args.no_profile, "compile": args.compile,
               "auto_batch": cuda and not args.no_auto_batch, "graphs": cuda, "fused": cuda, "scorer": cuda}
    chosen = None if args.sections is None else set(args.sections.split(","))
    if chosen is not None and chosen - set(default):
        ap.error(f"--sections: unknown {sorted(chosen - set(default))} (known: {sorted(default)})")

    def wanted(name: str) -> bool:
        return default[name] if chosen is None else name in chosen

    if cuda and (wanted("determinism") or wanted("graphs") or wanted("profile")):  # cuBLAS is deterministic only
        # with a fixed workspace: set before its first call (the profile and graphs sections run the job's mode too)
        from grads_ray.determinism import prepare

        prepare()
    model = build_model(args.model, dtype, device)
    n_params = sum(p.numel() for p in model.parameters())
    flop_params = n_params - (0 if model.config.tie_word_embeddings else model.get_input_embeddings().weight.numel())
    experts = sum(p.numel() for p in model.parameters() if p.dim() == 3)  # MoE: only k of E experts per token
    if experts:
        flop_params -= experts * (1 - model.config.num_experts_per_tok / model.config.num_experts)
    peak = matmul_tflops(device, dtype)
    engine = BatchedGradStats(model, **engine_kwargs(args))
    loop = LoopGradStats(model, **engine_kwargs(args))
    print(f"# {platform.node()} {platform.processor() or platform.machine()} device={device} dtype={args.dtype} "
          f"threads={torch.get_num_threads()} model={args.model} params={n_params / 1e6:.2f}M "
          f"matmul={peak:.3f} TFLOP/s torch={torch.__version__}")
    print(f"{'B':>4} {'T':>5} {'engine ex/s':>12} {'engine tok/s':>13} {'loop ex/s':>10} {'vs loop':>8} "
          f"{'plain/loop':>10} {'vs plain':>9} {'TFLOP/s':>8} {'of matmul':>9}")
    rows = []
    for length in (lengths if chosen is None else []):  # --sections: no main table
        loop_rate = None  # loop tokens/s at this length: measured once on up to loop_cap examples
        for batch in batches:
            data = make_batch(batch, length, model.config.vocab_size, seed=batch * 7919 + length, device=device)
            real = int(data[2].sum())
            t_engine = timed(lambda d=data: engine(*d), device, repeats)
            peak_engine = PEAKS.get("last")
            model.zero_grad(set_to_none=True)
            t_plain = timed(lambda d=data: plain_step(model, *d), device, repeats)
            peak_plain = PEAKS.get("last")
            model.zero_grad(set_to_none=True)
            if loop_rate is None or batch <= loop_cap:
                k = min(batch, loop_cap)
                sub = tuple(x[:k] for x in data)
                t_loop = timed(lambda s=sub: loop(*s), device, repeats)
                loop_rate = (int(sub[2].sum()) / t_loop, k / t_loop)  # tokens/s, examples/s
            engine_tok = real / t_engine
            speedup = engine_tok / loop_rate[0]
            tflops = 6 * flop_params * batch * length / t_engine / 1e12
            row = {"batch": batch, "length": length, "engine_examples_per_s": batch / t_engine,
                   "engine_tokens_per_s": engine_tok, "loop_examples_per_s": loop_rate[1],
                   "loop_tokens_per_s": loop_rate[0], "speedup_vs_loop": speedup,
                   "plain_step_vs_loop": real / t_plain / loop_rate[0],
                   "cost_vs_plain_step": t_engine / t_plain, "engine_tflops": tflops,
                   "fraction_of_matmul": tflops / peak,
                   "peak_mem_vs_plain": peak_engine / max(peak_plain, 1) if peak_engine is not None else None}
            rows.append(row)
            print(f"{batch:>4} {length:>5} {batch / t_engine:>12.2f} {engine_tok:>13.0f} {loop_rate[1]:>10.2f} "
                  f"{speedup:>7.2f}x {row['plain_step_vs_loop']:>9.2f}x {t_engine / t_plain:>8.2f}x {tflops:>8.3f} {tflops / peak:>8.1%}"
                  + (f"  peak {peak_engine / 2**20:.0f} / {peak_plain / 2**20:.0f} MiB" if peak_engine is not None else ""),
                  flush=True)
    mem = None
    if args.memory_at and chosen is None:
        mb, mt = (int(x) for x in args.memory_at.split(","))
        mem = memory_ratio(args, mb, mt, device, model)
        print(f"# peak memory at B={mb} T={mt}: plain step {mem['plain_mib']:.0f} MiB, engine "
              f"{mem['engine_mib']:.0f} MiB above model+batch: {mem['ratio']:.2f}x")
    head_t = 512 if 512 in lengths else lengths[-1]
    pick = {(r["batch"], r["length"]): r for r in rows}
    summary = {"device": device, "dtype": args.dtype, "model": args.model, "params_m": round(n_params / 1e6, 2),
               "threads": torch.get_num_threads(), "matmul_tflops": round(peak, 3), "headline_length": head_t}
    for b in batches:
        if (b, head_t) in pick:
            summary[f"speedup_vs_loop_b{b}"] = round(pick[(b, head_t)]["speedup_vs_loop"], 2)
    for t in lengths:
        if (16, t) in pick:
            summary[f"speedup_vs_loop_b16_t{t}"] = round(pick[(16, t)]["speedup_vs_loop"], 2)
            summary[f"cost_vs_plain_step_b16_t{t}"] = round(pick[(16, t)]["cost_vs_plain_step"], 2)
            summary[f"plain_step_vs_loop_b16_t{t}"] = round(pick[(16, t)]["plain_step_vs_loop"], 2)
            if pick[(16, t)]["peak_mem_vs_plain"] is not None:  # CUDA: peak allocated above model and batch
                summary[f"peak_mem_vs_plain_b16_t{t}"] = round(pick[(16, t)]["peak_mem_vs_plain"], 2)
    if rows:
        summary["best_fraction_of_matmul"] = round(max(r["fraction_of_matmul"] for r in rows), 3)
    if mem:
        summary["peak_mem_vs_plain"] = round(mem["ratio"], 2)
    at_b, at_t = (int(x) for x in args.profile_at.split(","))

    def at_profile_shape(name: str, report, seed: int) -> None:  # a section on one batch of --profile-at's shape
        if wanted(name):
            section(summary, name, lambda: report(
                model, make_batch(at_b, at_t, model.config.vocab_size, seed, device), args, device))

    # the newest questions first: a device check's time limit takes the last sections, not these
    at_profile_shape("fused", fused_report, 7)
    at_profile_shape("profile", device_profile, 1)
    at_profile_shape("graphs", graphs_report, 6)  # after the profile: a capture that breaks cannot take it
    if wanted("scorer"):  # the job's scorer four ways: what each setting would give a run
        section(summary, "scorer", lambda: scorer_report(args, at_t, device))
    moe_model = args.moe_model or ("moe-small" if cuda and (wanted("moe") or chosen is not None) else None)
    if wanted("determinism"):
        section(summary, "det", lambda: determinism_report(
            model, make_batch(16, head_t, model.config.vocab_size, 4, device), args, device))
        if moe_model and not args.no_moe:
            def moe_determinism() -> dict:
                moe = build_model(moe_model, dtype, device)
                return determinism_report(moe, make_batch(16, head_t, moe.config.vocab_size, 4, device), args, device,
                                          prefix="det_moe")
            section(summary, "det_moe", moe_determinism)
    if wanted("moe") and moe_model:
        args.moe_model = moe_model
        section(summary, "moe", lambda: moe_report(args, device, *(int(x) for x in args.moe_at.split(","))))
    at_profile_shape("extrema", extrema_report, 5)
    at_profile_shape("chunk", chunk_report, 3)
    at_profile_shape("compile", compile_report, 2)
    if wanted("auto_batch"):
        del engine, loop, model  # the scorer loads its own copy
        torch.cuda.empty_cache()
        section(summary, "auto_batch", lambda: auto_batch_report(args, head_t))
    if not args.no_dispatch and device == "cpu" and chosen is None:  # on a GPU the same count runs with --dispatch-only --device cpu
        summary.update(dispatch_summary(dispatch_report(args, "cpu")))
    print(json.dumps(summary))


if __name__ == "__main__":
    main()
