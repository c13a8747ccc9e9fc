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
from grads_ray.stages.score_units import LAYOUT, unit_layout, units_dir


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
    assert best == 32 and ran == [1, 2, 4, 8, 16, 32]  # 64 is over by extrapolation: not run
    assert [t["peak"] for t in trace] == [1000 + 100 * b for b in ran]


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
    assert found["batch_size"] == 8 and [t["rows"] for t in found["trace"]] == [1, 2, 4, 8]
    for rows, n_tokens, calls in seen:
        assert n_tokens == {(11.0, 10.0)}  # 11 tokens, all but the first a response token
        assert all(c == (rows, 11) for c in calls) and len(calls) >= (2 if response_only else 1)


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
    layout, kept = unit_layout(stats, {1}, 16, never)  # lowered by hand (out of memory): the units stay
    assert (layout.unit_rows, layout.batch_size, kept) == (512, 16, True)
    layout, kept = unit_layout(stats, {0}, 16, never)  # no unit of these shards: a fresh layout
    assert (layout.unit_rows, layout.batch_size, kept) == (128, 16, False)


def test_units_from_before_the_record(tmp_path):
    """Units written before 2026-12 have no layout.json: an integer setting is taken as theirs; auto
    cannot know it and says what to do."""
    stats = StageDir(tmp_path, "stats")
    _write_unit(stats, 0, 0)
    layout, kept = unit_layout(stats, {0}, 4, lambda: 1 / 0)
    assert (layout.unit_rows, layout.batch_size, kept) == (32, 4, True)
    with pytest.raises(ConfigError, match="set score.batch_size to the integer they were written with"):
        unit_layout(stats, {0}, "auto", lambda: 1 / 0)
    (units_dir(stats) / LAYOUT).write_text(json.dumps({"unit_rows": 96}))  # recorded before batch sizes were
    assert unit_layout(stats, {0}, "auto", lambda: 1 / 0)[0].batch_size == 12



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


def test_the_probe_stays_within_the_models_positions():
    from transformers import GPT2Config, LlamaConfig

    from grads_ray.gradients.batch_size import probe_length

    assert probe_length(GPT2Config(n_positions=64), 512) == 64  # learned positions: no longer row can be scored
    assert probe_length(LlamaConfig(max_position_embeddings=4096), 512) == 512
    assert probe_length(object(), 300) == 300


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
