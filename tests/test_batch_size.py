"""score.batch_size=auto: the search for the largest batch that fits, the probe's wiring on a real
scorer (its peaks faked: a CPU has no allocator peaks), the setting's checks, and the record that
keeps a rerun's batches those of the first pass."""

from __future__ import annotations

import json

import numpy as np
import pytest
from conftest import save_tiny_model

from grads_ray.config import ConfigError, load_config
from grads_ray.gradients.batch_size import BatchTooLarge, describe, largest_batch, probe, worst_rows
from grads_ray.rundir import StageDir
from grads_ray.stages.score_units import LAYOUT, Layout, unit_layout, units_dir


def linear(base: int, per_row: int, oom_from: int | None = None):
    """A peak of ``base + per_row * B`` bytes, out of memory from ``oom_from`` rows; the sizes run."""
    ran: list[int] = []

    def peak_at(rows: int) -> int | None:
        ran.append(rows)
        return None if oom_from and rows >= oom_from else base + per_row * rows
    return peak_at, ran


def test_the_largest_power_of_two_under_the_budget_is_chosen():
    peak_at, ran = linear(1000, 100)
    best, trace = largest_batch(peak_at, budget=1000 + 100 * 40, cap=128)
    assert best == 32 and ran == [1, 2, 4, 8, 16, 32, 64]  # 64 over: the search ends there
    assert [t["peak"] for t in trace] == [1000 + 100 * b for b in ran]


def test_a_peak_that_grows_slower_than_linearly_is_still_found():
    """Held factors flushed at a fixed size make peaks grow slower past some B: every size is run,
    none skipped by a guess."""
    peaks = {1: 10, 2: 20, 4: 30, 8: 40, 16: 90}
    assert largest_batch(lambda b: peaks[b], budget=45, cap=64)[0] == 8


def test_a_size_that_runs_out_of_memory_ends_the_search():
    peak_at, ran = linear(1000, 1, oom_from=16)
    best, trace = largest_batch(peak_at, budget=10**12, cap=128)
    assert best == 8 and ran == [1, 2, 4, 8, 16] and trace[-1] == {"rows": 16, "peak": None}


def test_a_peak_over_the_budget_that_extrapolation_missed_ends_it_too():
    peaks = {1: 10, 2: 11, 4: 12, 8: 500}  # a jump (a buffer that appears at 8 rows)
    ran = []
    best, _ = largest_batch(lambda b: ran.append(b) or peaks[b], budget=100, cap=64)
    assert best == 4 and ran == [1, 2, 4, 8]


def test_the_cap_bounds_the_batch():
    peak_at, ran = linear(0, 1)
    assert largest_batch(peak_at, budget=10**9, cap=64)[0] == 64 and ran[-1] == 64


@pytest.mark.parametrize("oom", [True, False])
def test_not_even_one_row_fitting_is_an_error(oom):
    peak_at, _ = linear(10**9, 1, oom_from=1 if oom else None)
    with pytest.raises(BatchTooLarge, match="ran out of memory" if oom else "peaked at 0.9 GiB"):
        largest_batch(peak_at, budget=2**20)


def test_the_log_line_says_why_not_the_next_size():
    gib = 2**30
    found = {"batch_size": 32, "budget": 70 * gib, "cap": 128, "device": "H200", "length": 512,
             "trace": [{"rows": 16, "peak": 30 * gib}, {"rows": 32, "peak": 50 * gib}, {"rows": 64, "peak": None}]}
    line = describe(found)
    assert "batch size 32" in line and "32 rows x 512 tokens" in line and "50.0 GiB of a 70.0 GiB budget" in line and "64 ran out of memory" in line


def test_worst_rows_are_max_length_and_all_response():
    ids, labels = worst_rows(50, 3, 9)
    assert [len(x) for x in ids] == [9, 9, 9] and all(x.max() < 50 for x in ids)
    assert all(y[0] == -100 and (y[1:] == x[1:]).all() for x, y in zip(ids, labels, strict=True))


@pytest.mark.parametrize("response_only", [False, True])
def test_the_probe_measures_the_scorers_whole_batch(tmp_path, response_only):
    """The probe runs the scorer's real per-batch work on batches of ``max_length``-token rows, one
    size after another; peaks are faked (the rows' tokens) against a budget of 8 rows."""
    from grads_ray.gradients.scorer import Scorer

    save_tiny_model("qwen2", tmp_path / "m")
    scorer = Scorer(str(tmp_path / "m"), settings={"response_only_loss": response_only, "proj_dim": 16},
                    batch_size=1)
    forwards = []
    scorer.model.register_forward_hook(lambda m, a, out: forwards.append(tuple(out.logits.shape[:2])))
    seen = []

    def peak(step, device):
        forwards.clear()
        got = step()
        seen.append((len(got.columns["loss"]), {(float(a), float(b)) for a, b in zip(
            got.columns["n_tokens"], got.columns["n_response_tokens"], strict=True)}, list(forwards)))
        assert np.isfinite(got.columns["grad_norm"]).all()
        return 100 * len(got.columns["loss"])

    found = probe(scorer, max_length=11, cap=64, peak=peak, budget=850)
    assert found["batch_size"] == 8 and [t["rows"] for t in found["trace"]] == [1, 2, 4, 8, 16]
    for rows, n_tokens, calls in seen:
        assert n_tokens == {(11.0, 10.0)}  # 11 tokens, all but the first a response token
        assert calls == [(rows, 11)] * (2 if response_only else 1)  # the engine's pass (+ the response-only one)


@pytest.mark.parametrize("value,want", [("auto", "auto"), ("8", 8), ("1", 1)])
def test_the_setting_is_auto_or_a_positive_integer(value, want):
    assert load_config(None, [f"score.batch_size={value}"]).score.batch_size == want
    assert load_config(None, []).score.batch_size == "auto"


@pytest.mark.parametrize("value", ["0", "-4", "big", "2.5", "true"])
def test_a_bad_setting_is_named(value):
    with pytest.raises(ConfigError, match="score.batch_size must be auto or an integer >= 1"):
        load_config(None, [f"score.batch_size={value}"])


def _write_unit(stats: StageDir, shard: int, start: int) -> None:
    folder = units_dir(stats) / f"{shard:05d}"
    folder.mkdir(parents=True, exist_ok=True)
    (folder / f"{start:09d}.parquet").write_bytes(b"")


def test_a_fresh_pass_records_its_layout_and_a_rerun_keeps_it(tmp_path):
    stats = StageDir(tmp_path, "stats")
    measured = []
    layout, kept = unit_layout(stats, {0, 1}, "auto", lambda: measured.append(1) or 64)
    assert (layout.unit_rows, layout.batch_size, kept, measured) == (512, 64, False, [1])
    assert json.loads((units_dir(stats) / LAYOUT).read_text()) == {"unit_rows": 512, "batch_size": 64}
    _write_unit(stats, 1, 0)
    never = lambda: pytest.fail("a rerun measured again")  # noqa: E731
    layout, kept = unit_layout(stats, {1}, "auto", never)  # auto: the first pass's batches, not a new measure
    assert (layout.unit_rows, layout.batch_size, kept) == (512, 64, True)
    layout, kept = unit_layout(stats, {0}, "auto", never)  # no unit of these shards yet: the same batches still
    assert (layout.unit_rows, layout.batch_size, kept) == (512, 64, False)
    layout, kept = unit_layout(stats, {1}, 16, never)  # lowered by hand (out of memory): the units stay
    assert (layout.unit_rows, layout.batch_size, kept) == (512, 16, True)
    layout, kept = unit_layout(stats, {1}, "auto", never)  # and a later auto rerun keeps the lowered size
    assert (layout.unit_rows, layout.batch_size, kept) == (512, 16, True)
    layout, kept = unit_layout(stats, {0}, 8, never)  # no unit of these shards: units of 8 batches of 8
    assert (layout.unit_rows, layout.batch_size, kept) == (64, 8, False)
    assert json.loads((units_dir(stats) / LAYOUT).read_text()) == {"unit_rows": 64, "batch_size": 8}


def test_units_from_before_the_record(tmp_path):
    """Units written before 2026-12 have no layout.json: auto cannot know their size and says what to
    do; an integer setting is taken as theirs (8 batches a unit, as then)."""
    stats = StageDir(tmp_path, "stats")
    _write_unit(stats, 0, 0)
    with pytest.raises(ConfigError, match="set score.batch_size to the integer they were written with"):
        unit_layout(stats, {0}, "auto", lambda: 1 / 0)
    layout, kept = unit_layout(stats, {0}, 4, lambda: 1 / 0)
    assert (layout.unit_rows, layout.batch_size, kept) == (32, 4, True)
    (units_dir(stats) / LAYOUT).write_text(json.dumps({"unit_rows": 96}))  # recorded before batch sizes were
    assert unit_layout(stats, {0}, "auto", lambda: 1 / 0)[0] == Layout(96, 12)


def test_the_score_stage_takes_the_measured_size_on_a_gpu_and_the_setting_elsewhere(tmp_path, monkeypatch):
    """The stage's glue (:func:`grads_ray.stages.score._layout`): under auto a GPU job's batch size is the
    measured one and its units are 8 of those batches, recorded; a CPU job's is 16; an integer wins."""
    from types import SimpleNamespace

    from grads_ray.stages import score
    from grads_ray.stages.score_pass import ScoringJob

    monkeypatch.setattr(score, "_measured_batch_size", lambda cfg, job: 64)
    cfg = load_config(None, [])
    for use_gpu, setting, want in ((True, "auto", 64), (False, "auto", 16), (True, 4, 4)):
        stats = StageDir(tmp_path / f"{use_gpu}-{setting}", "stats")
        job = ScoringJob(model_path="m", max_length=64, on_long="truncate", batch_size=16, use_gpu=use_gpu)
        got = score._layout(stats, {0: 100}, SimpleNamespace(score=SimpleNamespace(batch_size=setting),
                                                            data=cfg.data), job)
        assert (got.batch_size, got.unit_rows) == (want, 8 * want)
        assert json.loads((units_dir(stats) / LAYOUT).read_text()) == {"unit_rows": 8 * want, "batch_size": want}


def test_measuring_without_a_gpu_is_an_answer_not_a_crash(tmp_path):
    from grads_ray.gradients.batch_size import measure

    save_tiny_model("llama", tmp_path / "m")
    got = measure(str(tmp_path / "m"), settings={"proj_dim": 0}, max_length=16)
    assert got == {"error": "score.batch_size=auto: the task meant to measure the GPU's memory found no GPU"}


@pytest.mark.parametrize("arch,limit,want", [("gpt2", 64, 64), ("opt", 64, 64), ("llama", 64, 200), ("bloom", 0, 200)])
def test_the_probe_stays_within_learned_positions_only(arch, limit, want):
    """Learned absolute positions (GPT-2's wpe, OPT's embed_positions) cannot take a longer row, so
    the probe stops at their limit; rotary (Llama) and ALiBi (BLOOM) models take rows past their
    nominal limit, so they are probed at data.max_length."""
    from transformers import AutoModelForCausalLM, BloomConfig, GPT2Config, LlamaConfig, OPTConfig

    from grads_ray.gradients.batch_size import probe_length

    cfg = {"gpt2": lambda: GPT2Config(n_positions=limit, n_embd=16, n_layer=1, n_head=2, vocab_size=50),
           "opt": lambda: OPTConfig(max_position_embeddings=limit, hidden_size=16, num_hidden_layers=1,
                                    num_attention_heads=2, ffn_dim=16, word_embed_proj_dim=16, vocab_size=50),
           "llama": lambda: LlamaConfig(max_position_embeddings=limit, hidden_size=16, intermediate_size=16,
                                        num_hidden_layers=1, num_attention_heads=2, vocab_size=50),
           "bloom": lambda: BloomConfig(hidden_size=16, n_layer=1, n_head=2, vocab_size=50)}[arch]()
    assert probe_length(AutoModelForCausalLM.from_config(cfg), 200) == want


@pytest.mark.parametrize("fails_with", ["oom", "load", "too_large"])
def test_a_failed_measure_stops_the_run_with_one_line(monkeypatch, fails_with):
    """What goes wrong in the measuring task reaches the user as the scorer's own failures do: one
    line naming what was being done (exit 2 in the CLI), never the task's traceback."""
    import ray

    from grads_ray.stages import score
    from grads_ray.stages.score_pass import ScorerFailed, ScoringJob

    causes = {"oom": torch_oom(), "load": OSError("model.safetensors: no such file")}

    class Task:
        def remote(self, *a, **k):
            return "ref"

    def get(ref):
        if fails_with == "too_large":
            return {"error": "score: one row of 512 tokens (data.max_length=512) does not fit on the GPU (...)"}
        raise ray.exceptions.RayTaskError("measure", "Traceback (most recent call last): ...", causes[fails_with])

    monkeypatch.setattr(ray, "remote", lambda **k: lambda fn: Task())
    monkeypatch.setattr(ray, "get", get)
    job = ScoringJob(model_path="/models/m", max_length=512, on_long="truncate", batch_size=16, use_gpu=True)
    cfg = load_config(None, ["data.max_length=512"])
    with pytest.raises(ScorerFailed) as err:
        score._measured_batch_size(cfg, job)
    line = str(err.value)
    assert "\n" not in line and "Traceback" not in line
    if fails_with == "too_large":
        assert line.startswith("score: one row of 512 tokens")
    else:
        assert line.startswith("score: measuring the batch size (score.batch_size=auto) on /models/m: ")
        assert line.endswith("or set score.batch_size to an integer")
        assert ("OutOfMemoryError: CUDA out of memory. Tried to allocate 2.00 GiB; lower score.chunk_elements, or "
                "give the scorer more memory; or set" in line) == (fails_with == "oom")
        assert ("OSError: model.safetensors: no such file" in line) == (fails_with == "load")


def torch_oom():
    import torch

    return torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")


def test_a_scorer_on_the_loop_is_not_measured(tmp_path):
    """One example at a time, the memory hardly depends on the batch size: nothing to measure, and
    the batched engine's size would be a guess. auto is then 16, with the reason in the log line."""
    from grads_ray.gradients.batch_size import size_scorer
    from grads_ray.gradients.scorer import Scorer

    save_tiny_model("llama", tmp_path / "m")
    scorer = Scorer(str(tmp_path / "m"), settings={"engine": "loop", "proj_dim": 0}, batch_size=1)
    found = size_scorer(scorer, 32, peak=lambda step, device: pytest.fail("measured"), budget=1)
    assert found["batch_size"] == 16 and "one example at a time" in found["reason"]
    assert describe(found).startswith("batch size 16 (score.batch_size=auto, not measured: the scorer runs one")


@pytest.mark.parametrize("outcome", ["fits", "oom", "other"])
def test_cuda_peak_answers_out_of_memory_and_raises_the_rest(monkeypatch, outcome):
    """The CUDA calls faked (no GPU here): a step's peak, None when it ran out of memory (after which
    the cache is emptied), any other error raised."""
    from grads_ray.gradients import memory

    calls = []
    for name in ("synchronize", "empty_cache", "reset_peak_memory_stats"):
        monkeypatch.setattr(memory.torch.cuda, name, lambda *a, n=name: calls.append(n))
    monkeypatch.setattr(memory.torch.cuda, "max_memory_allocated", lambda *a: 123)

    def step():
        if outcome == "oom":
            raise memory.torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 1 GiB")
        if outcome == "other":
            raise ValueError("a bug")

    if outcome == "other":
        with pytest.raises(ValueError, match="a bug"):
            memory.cuda_peak(step, "cuda")
        return
    assert memory.cuda_peak(step, "cuda") == (123 if outcome == "fits" else None)
    assert calls[-1] == "empty_cache"


def test_the_target_set_is_never_batched_wider_than_the_corpus_under_auto():
    from grads_ray.stages.score import _target_batch_size

    assert [_target_batch_size("auto", b) for b in (4, 16, 128, None)] == [4, 16, 16, 16]
    assert _target_batch_size(32, 4) == 32  # an integer is the user's
