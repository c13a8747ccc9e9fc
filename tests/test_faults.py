"""Faults while scoring: the driver killed (SIGKILL, with its local Ray) and run again; a scorer actor
killed mid-batch (its unfinished shards scored again in a fresh pass). Either way the outputs hold every id
exactly once and equal those of an uninterrupted run. Errors that would recur (a model that cannot load,
out of memory) are not faults: one line, exit 2, no retry."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import pytest

from grads_ray.cli import main
from grads_ray.rundir import read_json, read_parts
from tests.conftest import record_progress, save_tiny_model

pytestmark = pytest.mark.ray


@pytest.fixture(scope="module")
def job(tmp_path_factory, tiny_tokenizer):
    """240 demo rows in 6 shards, a tiny Llama, scoring only (no warm-up), and the uninterrupted run."""
    from grads_ray.demo.corpus import sft_rows

    root = tmp_path_factory.mktemp("faults")
    corpus = root / "corpus"
    corpus.mkdir()
    rows = sft_rows()[:240]
    for k in range(3):
        (corpus / f"part{k}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows[k::3]))
    model = root / "model"
    save_tiny_model("llama", model, vocab=len(tiny_tokenizer))
    tiny_tokenizer.save_pretrained(model)
    shard_bytes = max(f.stat().st_size for f in corpus.iterdir()) // 2 + 1
    args = ["--model", str(model), "--data", str(corpus), "warmup.enabled=false", "data.max_length=96",
            f"data.shard_bytes={shard_bytes}", "score.batch_size=4", "score.num_actors=1", "seed=5"]
    return {"root": root, "args": args, "rows": len(rows)}


def _tables(out: Path) -> dict[str, pa.Table]:
    got = {}
    for name in ("stats", "features"):
        t = read_parts(sorted((out / name).glob("part-*.parquet")))
        got[name] = t.take(pc.sort_indices(t["id"]))
    return got


@pytest.fixture(scope="module")
def uninterrupted(job, ray_local):
    out = job["root"] / "clean"
    assert main(["score", *job["args"], "--output", str(out)]) == 0
    return _tables(out)


def _assert_same(out: Path, expected: dict[str, pa.Table], n_rows: int) -> None:
    got = _tables(out)
    ids = got["stats"]["id"].to_pylist()
    rejected = [json.loads(x)["id"] for x in (out / "rejected.jsonl").read_text().splitlines()]
    assert len(ids) == len(set(ids)) and len(ids) + len(rejected) == n_rows
    for name, table in expected.items():
        assert got[name].column_names == table.column_names, name
        for col in table.column_names:  # bit-identical, NaN equal to NaN (Arrow's equals says no)
            want, have = table[col].combine_chunks(), got[name][col].combine_chunks()
            if pa.types.is_list(want.type):
                want, have = want.flatten(), have.flatten()
            np.testing.assert_array_equal(have.to_numpy(zero_copy_only=False),
                                          want.to_numpy(zero_copy_only=False), err_msg=f"{name}.{col}")


RAY_RESTART_WARNING = "constructor arguments in the object store"  # Ray's, for actors it would restart


def test_a_scorer_killed_mid_batch_is_restarted(job, uninterrupted, tmp_path, monkeypatch, caplog):
    flag = tmp_path / "crashed"
    monkeypatch.setenv("GRADS_RAY_TEST_SCORER_HOOKS", json.dumps({"crash_once": str(flag), "crash_at_call": 2}))
    out = tmp_path / "out"
    with caplog.at_level("WARNING", logger="grads_ray"):
        assert main(["score", *job["args"], "--output", str(out)]) == 0
    assert flag.exists()  # the actor did die (SIGKILL on its second block, half-way through it)
    assert "a scorer process died" in caplog.text and "again in a fresh pass" in caplog.text
    _assert_same(out, uninterrupted, job["rows"])


def test_the_driver_killed_while_scoring_resumes(job, uninterrupted, tmp_path):
    out = tmp_path / "out"
    cmd = [sys.executable, "-m", "grads_ray", "score", *job["args"], "--output", str(out)]
    env = {**os.environ, "GRADS_RAY_TEST_SCORER_HOOKS": json.dumps({"sleep": 0.5})}  # slow enough to catch
    env.pop("RAY_ADDRESS", None)
    stderr = (tmp_path / "stderr.txt").open("w")
    proc = subprocess.Popen(cmd, env=env, start_new_session=True, stdout=subprocess.DEVNULL, stderr=stderr)
    done = out / "stats" / ".ledger" / "done"
    total = None
    deadline = time.time() + 600
    try:
        while proc.poll() is None and time.time() < deadline:
            shards = out / "rows" / ".ledger" / "shards.json"
            total = total or (len(json.loads(shards.read_text())) if shards.exists() else None)
            if done.is_dir() and len(list(done.glob("*.json"))) >= 2:
                break
            time.sleep(0.05)
    finally:
        os.killpg(proc.pid, signal.SIGKILL)  # the driver and the local Ray it started, all at once
        proc.wait()
    finished_names = {p.name for p in done.glob("*.json")}
    finished_before = len(finished_names)
    assert total and 0 < finished_before < total, (finished_before, total)
    units = out / "stats" / ".ledger" / "units"  # written units of shards not finished: not scored again
    written = [f for f in units.rglob("*.parquet") if not f.name.startswith(".")
               and not (done / f"{f.parent.name}.json").exists()] if units.is_dir() else []
    # a plain run greets its user with no error line: Ray's actor restarts are off (grads_ray/stages/score_pass.py),
    # so Ray's warning that restarting an actor needs its arguments from the object store is not raised
    assert RAY_RESTART_WARNING not in (tmp_path / "stderr.txt").read_text()
    assert main(["score", *job["args"], "--output", str(out)]) == 0
    info = read_json(out / "stats" / ".ledger" / "SUCCESS.json")
    assert info["shards_this_run"] == total - finished_before  # the finished shards were not scored again
    left = [read_json(p)["rows"] for p in (out / "rows" / ".ledger" / "done").glob("*.json")
            if p.name not in finished_names]
    assert info["units_resumed"] == len(written)
    assert info["units_scored"] + len(written) == sum(-(-n // info["unit_rows"]) for n in left)
    _assert_same(out, uninterrupted, job["rows"])


def test_a_new_corpus_version_rescores_only_new_and_changed_shards(job, uninterrupted, tmp_path):
    """Scheduled curation: the same output folder, a corpus with one row changed and one file added.
    Shards whose rows are unchanged come from the cache (content hashes); the result equals a fresh
    run on the new version."""
    import shutil

    from grads_ray.demo.corpus import sft_rows

    corpus = tmp_path / "corpus"
    shutil.copytree(job["args"][job["args"].index("--data") + 1], corpus)
    args = [a if a != job["args"][job["args"].index("--data") + 1] else str(corpus) for a in job["args"]]
    out = tmp_path / "out"
    assert main(["score", *args, "--output", str(out)]) == 0
    before = read_json(out / "stats" / ".ledger" / "SUCCESS.json")
    assert before["shards_reused"] == 0

    lines = (corpus / "part1.jsonl").read_text().splitlines()
    row = json.loads(lines[-1])
    row["response"] += " (revised)"
    (corpus / "part1.jsonl").write_text("\n".join([*lines[:-1], json.dumps(row)]) + "\n")
    (corpus / "part3.jsonl").write_text("".join(json.dumps(r) + "\n" for r in sft_rows()[300:340]))
    assert main(["score", *args, "--output", str(out)]) == 0
    shards = json.loads((out / "rows" / ".ledger" / "shards.json").read_text())
    new = sum(s["source"] == "part3.jsonl" for s in shards)
    info = read_json(out / "stats" / ".ledger" / "SUCCESS.json")
    assert info["shards_this_run"] == new + 1 and info["shards_reused"] == len(shards) - new - 1

    fresh = tmp_path / "fresh"
    assert main(["score", *args, "--output", f"file://{fresh}", f"score.cache_dir={tmp_path / 'other'}"]) == 0
    assert read_json(fresh / "stats" / ".ledger" / "SUCCESS.json")["shards_reused"] == 0
    _assert_same(out, _tables(fresh), job["rows"] + 40)


def test_progress_counts_rows_as_they_come_back_from_a_one_shard_corpus(job, ray_local, tmp_path, monkeypatch):
    """One shard of 240 rows: the scorers get units of 8 batches (32 rows) and the progress line
    moves unit by unit, not once at the end of the shard."""
    corpus = tmp_path / "one.jsonl"
    src = Path(job["args"][job["args"].index("--data") + 1])
    corpus.write_text("".join(f.read_text() for f in sorted(src.glob("*.jsonl"))))
    args = [a if a != str(src) else str(corpus) for a in job["args"]]
    args = [a for a in args if not a.startswith("data.shard_bytes=")]
    updates = record_progress(monkeypatch)
    assert main(["score", *args, "--output", str(tmp_path / "out")]) == 0
    assert read_json(tmp_path / "out" / "rows" / ".ledger" / "SUCCESS.json")["shards"] == 1
    rows = [n for stage, _, n in updates if stage == "score"]
    assert sum(rows) == job["rows"] and len(rows) >= job["rows"] // 32 and max(rows) <= 32


def test_a_shard_longer_than_ray_datas_no_progress_timeout_completes(job, ray_local, tmp_path, monkeypatch):
    """One shard of six units whose scoring (~60 s) outlasts Ray Data's no-progress timeout
    (lowered here to 45 s; 30 min by default). Each scorer call is one unit (~10 s), so the pass
    makes progress unit by unit and completes; with the shard in one call it fails with
    ExecutionTimeoutError. (Ray Data counts a scorer's start as no progress too: the timeout leaves
    ~35 s for a cold start on a loaded machine, the scorer's self-check included.)"""
    import ray

    corpus = tmp_path / "one.jsonl"
    src = Path(job["args"][job["args"].index("--data") + 1])
    lines = "".join(f.read_text() for f in sorted(src.glob("*.jsonl"))).splitlines()
    corpus.write_text("\n".join(lines[:192]) + "\n")  # 6 units of 8 batches of 4
    args = [a if a != str(src) else str(corpus) for a in job["args"]]
    args = [a for a in args if not a.startswith("data.shard_bytes=")]
    monkeypatch.setattr(ray.data.DataContext.get_current(), "execution_no_progress_timeout_s", 45.0)
    monkeypatch.setenv("GRADS_RAY_TEST_SCORER_HOOKS", json.dumps({"sleep": 1.25}))  # 8 batches: ~10 s a unit
    out = tmp_path / "out"
    t0 = time.time()
    assert main(["score", *args, "--output", str(out)]) == 0
    took = time.time() - t0
    info = read_json(out / "stats" / ".ledger" / "SUCCESS.json")
    assert read_json(out / "rows" / ".ledger" / "SUCCESS.json")["shards"] == 1
    assert info["unit_rows"] == 32 and info["units_scored"] == 6 and took > 45.0
    units = out / "stats" / ".ledger" / "units"
    assert not units.exists() or not any(units.iterdir())  # merged into the shard's parts, then deleted


def test_a_model_that_cannot_load_ends_the_run_at_once(job, ray_local, tmp_path, capsys):
    """A scorer that cannot start (weights cut short) is an error that would recur: one line naming the
    model and the error, exit 2, no retry, no traceback (before: three fresh passes, then exit 1)."""
    src = Path(job["args"][job["args"].index("--model") + 1])
    bad = tmp_path / "bad-model"
    bad.mkdir()
    for f in src.iterdir():
        (bad / f.name).write_bytes(f.read_bytes())
    weights = bad / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    args = [a if a != str(src) else str(bad) for a in job["args"]]
    t0 = time.time()
    assert main(["score", *args, "--output", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith(f"grads-ray: error: score: the scorer could not start on {bad}: SafetensorError"), err
    assert "Traceback" not in "\n".join(err) and "fresh pass" not in "\n".join(err)
    assert time.time() - t0 < 120  # one pass (and the other 5 shards' ingest), not four


def test_out_of_memory_in_a_batch_names_the_setting_to_lower(job, ray_local, tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("GRADS_RAY_TEST_SCORER_HOOKS", json.dumps({"oom_at_call": 2}))
    assert main(["score", *job["args"], "--output", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("grads-ray: error: score: scoring shard "), err
    assert "OutOfMemoryError: CUDA out of memory" in err[-1] and "lower score.batch_size (now 4)" in err[-1]


def test_a_rerun_with_the_batch_size_lowered_keeps_the_written_units(job, uninterrupted, ray_local, tmp_path,
                                                                    monkeypatch, capsys):
    """What the line above tells the user to do: the rerun with score.batch_size lowered scores only
    the rows no unit holds yet, in the first run's units (cut in smaller batches), so no row is scored
    twice or missed; the rows of units written before are the first run's, bit for bit."""
    out = tmp_path / "out"
    monkeypatch.setenv("GRADS_RAY_TEST_SCORER_HOOKS", json.dumps({"oom_at_call": 2}))
    assert main(["score", *job["args"], "--output", str(out)]) == 2
    units = out / "stats" / ".ledger" / "units"
    before = {f.relative_to(units): f.read_bytes() for f in units.rglob("*.parquet")}
    done_before = {f.name for f in (out / "stats" / ".ledger" / "done").glob("*.json")}
    assert before and not done_before  # a unit written, its shard unfinished
    monkeypatch.delenv("GRADS_RAY_TEST_SCORER_HOOKS")
    capsys.readouterr()
    args = [a if a != "score.batch_size=4" else "score.batch_size=2" for a in job["args"]]
    assert main(["score", *args, "--output", str(out)]) == 0
    got = _tables(out)
    ids = got["stats"]["id"].to_pylist()
    rejected = [json.loads(x)["id"] for x in (out / "rejected.jsonl").read_text().splitlines()]
    assert len(ids) == len(set(ids)) and len(ids) + len(rejected) == job["rows"]
    assert got["stats"]["id"].to_pylist() == uninterrupted["stats"]["id"].to_pylist()
    for col in ("loss", "grad_norm", "grad_mean", "grad_std", "grad_max", "grad_min"):
        np.testing.assert_allclose(got["stats"][col].to_numpy(), uninterrupted["stats"][col].to_numpy(),
                                   rtol=1e-4, atol=1e-7, err_msg=col)
    kept = set().union(*(pq.read_table(pa.BufferReader(b)).column("id").to_pylist() for b in before.values()))
    at = {i: k for k, i in enumerate(ids)}
    for col in ("loss", "grad_norm", "grad_max"):  # the rows written before: the first run's numbers
        want = uninterrupted["stats"][col].to_numpy()
        np.testing.assert_array_equal(got["stats"][col].to_numpy()[[at[i] for i in kept]],
                                      want[[at[i] for i in kept]], err_msg=col)
    info = read_json(out / "stats" / ".ledger" / "SUCCESS.json")
    assert info["unit_rows"] == 32 and info["batch_size"] == 2, info  # the first run's units
    assert not units.exists()  # merged, and the layout gone with them


def _sigterm(command: list[str], tmp_path: Path, marker: str, delay: float = 0.0, env_extra: dict | None = None
             ) -> tuple[int, float, str, int]:
    """Run ``grads_ray COMMAND`` in its own process (its own local Ray) and send it SIGTERM ``delay``
    seconds after ``marker`` shows in its stderr. -> (exit code, seconds from the signal to the exit,
    stderr, its session id: every process it started)."""
    env = {**{k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}, **(env_extra or {})}
    stderr_path = tmp_path / "stderr.txt"
    with stderr_path.open("w") as stderr:
        proc = subprocess.Popen([sys.executable, "-m", "grads_ray", *command], env=env, start_new_session=True,
                                stdout=subprocess.DEVNULL, stderr=stderr)
    try:
        deadline = time.time() + 400
        while marker not in stderr_path.read_text() and proc.poll() is None and time.time() < deadline:
            time.sleep(0.1)
        time.sleep(delay)
        os.kill(proc.pid, signal.SIGTERM)
        t0 = time.time()
        code = proc.wait(timeout=120)
        took = time.time() - t0
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    return code, took, stderr_path.read_text(), proc.pid


def _left_running(session: int, grace: float = 10.0) -> list[str]:
    """Processes of ``session`` still running ``grace`` seconds after its leader exited (Ray's agents
    end on their own a moment after their raylet), zombies aside: where PID 1 does not reap (a
    container), a dead child stays in the table."""
    deadline = time.time() + grace
    while True:
        ps = subprocess.run(["ps", "-o", "pid=,stat=,args=", "-s", str(session)], capture_output=True, text=True)
        left = [line.strip() for line in ps.stdout.splitlines() if "Z" not in line.split()[1]]
        if not left or time.time() > deadline:
            return left
        time.sleep(0.5)


def _assert_clean_stop(stage: str, code: int, took: float, err: str, session: int, delay: float) -> None:
    """What a SIGTERM during ``stage`` must give: exit 143 within 30 s, a last line saying what is
    kept and how to go on, no C++ dump from Ray, no traceback, no process left. A stage that ended
    before the signal (a fast machine) skips the test."""
    if code == 0:
        pytest.skip(f"the {stage} stage finished before the signal")
    assert code == 143 and took < 30, (code, took, delay, err[-2000:])
    last = err.strip().splitlines()[-1]
    assert last.startswith(f"grads-ray: stopped by SIGTERM during {stage}: ") and "rerun the same command" in last, last
    assert "SIGTERM received" not in err and "Traceback" not in err, err[-2000:]
    left = _left_running(session)
    assert not left, f"processes of the stopped run still alive: {left}"


def test_sigterm_while_scoring_stops_cleanly_and_the_rerun_completes(job, uninterrupted, tmp_path):
    """SIGTERM to the driver at a random moment of scoring (``ray job stop``, Kubernetes, a scheduler):
    exit 143 within 30 s, a last line that says what is kept and how to go on, no C++ stack dump from
    Ray, no Ray process left behind; the same command then completes with the uninterrupted outputs."""
    import random

    out = tmp_path / "out"
    delay = random.Random().uniform(0.5, 25)  # somewhere in the stage: start-up, first units, merging
    code, took, err, session = _sigterm(["score", *job["args"], "--output", str(out)], tmp_path,
                                        "[grads-ray] score ...", delay,
                                        {"GRADS_RAY_TEST_SCORER_HOOKS": json.dumps({"sleep": 0.5})})
    _assert_clean_stop("score", code, took, err, session, delay)
    assert main(["score", *job["args"], "--output", str(out)]) == 0
    _assert_same(out, uninterrupted, job["rows"])


def test_sigterm_during_fine_tune_stops_at_once_and_the_rerun_finishes(job, ray_local, tmp_path):
    """SIGTERM while Ray Train trains (the driver waits inside ``trainer.fit()``): exit 143 within 30 s,
    not when training ends; the rerun resumes and saves the model. (That a run resumed from its
    checkpoint equals an uninterrupted one: tests/test_training.py.)"""
    out = tmp_path / "out"
    args = [*job["args"], "select.budget=50%", "finetune.epochs=30", "--output", str(out)]
    code, took, err, _ = _sigterm(["finetune", *args], tmp_path, "finetune: 1 of")
    assert code == 143 and took < 30, (code, took, err[-2000:])
    last = err.strip().splitlines()[-1]
    assert last.startswith("grads-ray: stopped by SIGTERM during finetune: at step "), last
    assert "SIGTERM received" not in err and "Traceback" not in err, err[-2000:]
    assert "will hang" not in err, err[-2000:]  # Ray Data's warning when it starts before Ray sees free CPUs
    assert main(["finetune", *args]) == 0
    assert (out / "finetune" / "model" / "config.json").is_file()


def _similarity_tables(out: Path) -> pa.Table:
    t = read_parts(sorted((out / "similarity").glob("part-*.parquet")))
    return t.take(pc.sort_indices(t["id"]))


def test_sigterm_during_similarity_stops_cleanly_and_the_rerun_completes(job, uninterrupted, tmp_path, monkeypatch):
    """SIGTERM at a random moment of the similarity stage (index workers filling, chunks searched):
    exit 143 within 30 s, the last line says what is kept; the rerun's neighbours, groups and clusters
    equal an uninterrupted run's. Chunks of 16 rows, 0.4 s each, make the tiny corpus's stage long."""
    import random
    import shutil

    hooks = json.dumps({"chunk_rows": 16, "sleep": 0.4})
    clean, out = tmp_path / "clean", tmp_path / "out"
    for d in (clean, out):  # scored already (the uninterrupted run): only similarity runs
        shutil.copytree(job["root"] / "clean", d)
    monkeypatch.setenv("GRADS_RAY_TEST_SIMILARITY_HOOKS", hooks)
    assert main(["similarity", *job["args"], "--output", str(clean)]) == 0
    delay = random.Random().uniform(0.2, 6)  # Ray starting, the index filled, chunks searched
    code, took, err, session = _sigterm(["similarity", *job["args"], "--output", str(out)], tmp_path,
                                        "[grads-ray] similarity ...", delay,
                                        {"GRADS_RAY_TEST_SIMILARITY_HOOKS": hooks})
    _assert_clean_stop("similarity", code, took, err, session, delay)
    assert main(["similarity", *job["args"], "--output", str(out)]) == 0
    want, have = _similarity_tables(clean), _similarity_tables(out)
    assert have.num_rows == want.num_rows == uninterrupted["stats"].num_rows
    for col in ("id", "position", "nn_rows", "nn_sims", "diversity", "cluster", "dup_group"):
        assert have[col].to_pylist() == want[col].to_pylist(), col


def test_a_one_cpu_cluster_scores_instead_of_waiting_for_ever(job, tmp_path):
    """One CPU (a small container): the scorer and the tasks feeding it share it. Before, the scorer
    reserved the only CPU, its feeders never ran and the job waited without end."""
    out = tmp_path / "out"
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    res = subprocess.run([sys.executable, "-m", "grads_ray", "score", *job["args"], "--output", str(out),
                          "ray.num_cpus=1"], env=env, capture_output=True, text=True, timeout=400)
    assert res.returncode == 0, res.stderr[-2000:]
    info = read_json(out / "stats" / ".ledger" / "SUCCESS.json")
    assert info["scored"] + info["rejected"] == job["rows"] and info["scored"] > 0
