"""A real two-node Ray cluster on this machine (``ray start --head`` + ``ray start --address``, token
authentication on) and a job sent through the real ``ray job submit`` CLI, as users run it."""

from __future__ import annotations

import json
import os
import secrets
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
from ray._common.utils import get_ray_address_file

from grads_ray.rundir import read_json, read_parts
from tests.conftest import save_tiny_model

pytestmark = [pytest.mark.ray, pytest.mark.cluster]
REPO = Path(__file__).resolve().parents[1]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _alive_nodes(address: str, env: dict[str, str]) -> int:
    code = f"import ray; ray.init(address={address!r}, log_to_driver=False); print(sum(n['Alive'] for n in ray.nodes()))"
    try:
        got = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=60)
    except subprocess.TimeoutExpired:
        return 0
    return int(got.stdout.strip().splitlines()[-1]) if got.returncode == 0 and got.stdout.strip() else 0


@pytest.fixture
def two_nodes(tmp_path, request):
    """A head (1 CPU, or the test's indirect parameter; dashboard on 127.0.0.1) and a second node
    (2 CPUs, its ``ray start`` process as ``worker``), both with token auth.
    ``--block`` keeps each ``ray start`` in the foreground, so ending it stops only its own node
    (``ray stop`` would stop every Ray on the machine, the test session's included). ``ray start --head``
    records its address in Ray's ``ray_current_cluster`` file, which ending it leaves behind; the file is
    put back as it was, since Ray Train's placement-group cleaner looks a cluster up through it and
    stalls ~12 s at the end of every later training run on this machine when it names a dead one."""
    env = {**os.environ, "RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": secrets.token_hex(16),
           "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false",
           # a node sent SIGTERM drains for up to 30 s first (Ray 2.60): nothing here needs draining
           "RAY_GRACEFUL_SHUTDOWN_DRAIN_TIMEOUT_S": "0"}
    env.pop("RAY_ADDRESS", None)
    gcs, dash = _free_port(), _free_port()
    logs = tmp_path / "ray-logs"
    logs.mkdir()
    address_file = Path(get_ray_address_file(None))
    address_before = address_file.read_text() if address_file.exists() else None
    common = ["--block", "--disable-usage-stats"]
    head = subprocess.Popen(
        ["ray", "start", "--head", f"--port={gcs}", "--dashboard-host=127.0.0.1", f"--dashboard-port={dash}",
         f"--dashboard-agent-listen-port={_free_port()}",
         f"--num-cpus={getattr(request, 'param', 1)}", *common], env=env, stdout=open(logs / "head.log", "w"), stderr=subprocess.STDOUT)
    procs = [head]
    try:
        deadline = time.time() + 180
        while "Ray runtime started" not in (logs / "head.log").read_text():
            assert time.time() < deadline and head.poll() is None, (logs / "head.log").read_text()[-3000:]
            time.sleep(1)
        while _alive_nodes(f"127.0.0.1:{gcs}", env) < 1:
            assert time.time() < deadline and head.poll() is None, (logs / "head.log").read_text()[-3000:]
            time.sleep(2)
        worker = subprocess.Popen(
            ["ray", "start", f"--address=127.0.0.1:{gcs}", "--num-cpus=2",
             f"--dashboard-agent-listen-port={_free_port()}", *common],
            env=env, stdout=open(logs / "worker.log", "w"), stderr=subprocess.STDOUT)
        procs.append(worker)
        while _alive_nodes(f"127.0.0.1:{gcs}", env) < 2:
            assert time.time() < deadline and worker.poll() is None, (logs / "worker.log").read_text()[-3000:]
            time.sleep(2)
        yield {"dashboard": f"http://127.0.0.1:{dash}", "gcs": f"127.0.0.1:{gcs}", "env": env, "worker": worker}
    finally:
        for p in reversed(procs):
            p.terminate()
        for p in reversed(procs):
            try:
                p.wait(60)
            except subprocess.TimeoutExpired:
                p.kill()
        if address_before is None:
            address_file.unlink(missing_ok=True)
        else:
            address_file.write_text(address_before)


def _job_config(tmp_path: Path, tiny_tokenizer, n_rows: int) -> tuple[Path, Path, list[dict]]:
    """A corpus of ``n_rows`` real rows, a tiny model and a job config scoring on two actors."""
    from grads_ray.demo.corpus import sft_rows

    corpus = tmp_path / "corpus"
    corpus.mkdir()
    rows = sft_rows()[:n_rows]
    (corpus / "pairs.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    model = tmp_path / "model"
    save_tiny_model("llama", model, vocab=len(tiny_tokenizer))
    tiny_tokenizer.save_pretrained(model)
    out = tmp_path / "out"
    cfg = tmp_path / "job.yaml"
    cfg.write_text(f"""
output: {out}
seed: 3
data: {{paths: [{corpus}], max_length: 96, shard_bytes: 8000}}
model: {{path: {model}}}
warmup: {{enabled: false}}
score: {{batch_size: 8, num_actors: 2}}
select: {{method: grads, budget: "25%"}}
finetune: {{enabled: false}}
""")
    return cfg, out, rows


def _every_row_once(out: Path, n_rows: int) -> dict:
    manifest = read_json(out / "manifest.json")
    assert manifest["accounting"]["input_rows"] == n_rows
    ids = read_parts(sorted((out / "stats").glob("part-*.parquet")), ["id"])["id"].to_pylist()
    assert len(ids) == len(set(ids))
    assert len(ids) + manifest["accounting"]["rejected_ingest"] + manifest["accounting"]["rejected_score"] == n_rows
    return manifest


def test_a_job_submitted_to_a_two_node_cluster_uses_both_nodes(two_nodes, tmp_path, tiny_tokenizer):
    cfg, out, rows = _job_config(tmp_path, tiny_tokenizer, 120)
    job = f"grads-ray-test-{secrets.token_hex(4)}"
    got = subprocess.run(
        ["ray", "job", "submit", "--address", two_nodes["dashboard"], "--working-dir", str(REPO),
         "--submission-id", job, "--", "python", "jobs/run.py", str(cfg)],
        env=two_nodes["env"], capture_output=True, text=True, timeout=900)
    (tmp_path / "job.log").write_text(got.stdout + got.stderr)
    assert got.returncode == 0, got.stdout[-6000:]
    status = subprocess.run(["ray", "job", "status", "--address", two_nodes["dashboard"], job],
                            env=two_nodes["env"], capture_output=True, text=True, timeout=120)
    assert "succeeded" in (status.stdout + status.stderr).lower()

    manifest = _every_row_once(out, len(rows))
    assert (out / "selected.jsonl").exists() and (out / "selection.parquet").exists()
    nodes = set(manifest["stages"]["ingest"]["nodes"]) | set(manifest["stages"]["score"]["nodes"])
    assert len(nodes) == 2, manifest["stages"]
    for name in ("manifest.json", "config.yaml"):  # no secret reaches the outputs
        assert two_nodes["env"]["RAY_AUTH_TOKEN"] not in (out / name).read_text()

    # Without the token the dashboard refuses the job: authentication is really on.
    env = {k: v for k, v in two_nodes["env"].items() if k != "RAY_AUTH_TOKEN"}
    env["HOME"] = str(tmp_path)  # no ~/.ray/auth_token to fall back on
    refused = subprocess.run(["ray", "job", "list", "--address", two_nodes["dashboard"]],
                             env=env, capture_output=True, text=True, timeout=120)
    assert refused.returncode != 0


def _descendants(pid: int) -> list[int]:
    table = subprocess.run(["ps", "-e", "-o", "pid=,ppid="], capture_output=True, text=True).stdout.split()
    children: dict[int, list[int]] = {}
    for child, parent in zip(table[::2], table[1::2], strict=True):
        children.setdefault(int(parent), []).append(int(child))
    found, todo = [], [pid]
    while todo:
        kids = children.get(todo.pop(), [])
        found += kids
        todo += kids
    return found


@pytest.mark.parametrize("two_nodes", [2], indirect=True)
def test_a_worker_node_lost_mid_score_costs_only_its_units(two_nodes, tmp_path, tiny_tokenizer):
    """Preemption: the second node killed outright mid-score (every process of it, SIGKILL, as a spot
    node disappears). The job finishes on the head alone, every id once. Where the node held a
    scorer with a unit in flight, that unit is scored again in a fresh pass (a unit written is never
    redone); where its scorer was still starting, the head's scorer takes the rest."""
    import signal

    cfg, out, rows = _job_config(tmp_path, tiny_tokenizer, 240)
    env_vars = {"GRADS_RAY_TEST_SCORER_HOOKS": json.dumps({"sleep": 0.3})}  # a stage long enough to cut
    log = tmp_path / "job.log"
    submit = subprocess.Popen(
        ["ray", "job", "submit", "--address", two_nodes["dashboard"], "--working-dir", str(REPO),
         "--runtime-env-json", json.dumps({"env_vars": env_vars}), "--", "python", "jobs/run.py", str(cfg)],
        env=two_nodes["env"], stdout=log.open("w"), stderr=subprocess.STDOUT)
    try:
        deadline = time.time() + 600
        while "[grads-ray] score: " not in log.read_text():  # the first units are written
            assert submit.poll() is None and time.time() < deadline, log.read_text()[-4000:]
            time.sleep(0.5)
        node = two_nodes["worker"]
        at_kill = log.read_text()
        for pid in [node.pid, *_descendants(node.pid)]:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        assert submit.wait(timeout=900) == 0, log.read_text()[-6000:]
    finally:
        if submit.poll() is None:
            submit.kill()
    assert "[grads-ray] score done" not in at_kill  # the node was lost mid-score
    _every_row_once(out, len(rows))
    assert (out / "selected.jsonl").exists()
