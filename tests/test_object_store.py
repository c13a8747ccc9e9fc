"""The run directory and the base model in an object store: a whole run (ingest, score, similarity,
select, fine-tune, evaluate) with ``output=s3://BUCKET/run`` and ``model.path=s3://BUCKET/model``
against a local S3 endpoint (moto's server on 127.0.0.1), checked equal to the same run on local
folders; a rerun finds every stage finished and rewrites none of their objects.

The driver runs as a subprocess with the endpoint and credentials in its environment (as on a
cluster node: credentials come from the environment, never the config); it starts its own local Ray.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from grads_ray.cli import main
from tests.conftest import BUCKET, save_tiny_model

pytestmark = pytest.mark.ray
STAGES = ("rows", "stats", "features", "similarity", "finetune", "evaluate")


@pytest.fixture(scope="module")
def job(tmp_path_factory, tiny_tokenizer, s3):
    """160 demo rows in 2 files, held-out and general text, a tiny Llama (local, and a copy in the
    bucket), and a config with no warm-up (the fine-tune's model is the one uploaded and fetched)."""
    from grads_ray.demo.corpus import general_text, sft_rows

    _, fs = s3
    root = tmp_path_factory.mktemp("objstore")
    (root / "corpus").mkdir()
    rows = sft_rows()
    for k in range(2):
        (root / "corpus" / f"part{k}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows[k:160:2]))
    (root / "heldout.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows[-12:]))
    (root / "general.txt").write_text(general_text()[:8000])
    model = root / "model"
    save_tiny_model("llama", model, vocab=len(tiny_tokenizer))
    tiny_tokenizer.save_pretrained(model)
    for f in model.iterdir():
        fs.put_file(str(f), f"{BUCKET}/model/{f.name}")
    (root / "job.yaml").write_text(f"""
seed: 3
data: {{paths: [{root / 'corpus'}], max_length: 96, shard_bytes: 8000}}
warmup: {{enabled: false}}
score: {{batch_size: 8, num_actors: 1}}
select: {{method: grads, budget: "30%"}}
finetune: {{epochs: 1, batch_size: 8, lr: 0.005}}
eval: {{domain_paths: [{root / 'heldout.jsonl'}], general_paths: [{root / 'general.txt'}], max_general_blocks: 8,
       generate: 2, max_new_tokens: 6}}
""")
    return {"root": root, "model": model, "config": root / "job.yaml", "rows": 160}


def _run(job, env: dict[str, str], output: str, model: str, cwd: Path) -> str:
    cwd.mkdir(exist_ok=True)
    full = {**os.environ, **env}
    full.pop("RAY_ADDRESS", None)
    cmd = [sys.executable, "-m", "grads_ray", "run", str(job["config"]), "--output", output, f"model.path={model}"]
    proc = subprocess.run(cmd, env=full, cwd=cwd, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc.stdout


def _objects(fs, prefix: str) -> dict[str, tuple]:
    """Every object under the prefix -> (size, last modified, ETag)."""
    return {f: (fs.info(f)["size"], fs.info(f).get("LastModified"), fs.info(f).get("ETag"))
            for f in fs.find(prefix)}


@pytest.fixture(scope="module")
def runs(job, s3, ray_local):
    env, fs = s3
    local = job["root"] / "local-out"  # the reference: in this process, on the tests' Ray
    assert main(["run", str(job["config"]), "--output", str(local), f"model.path={job['model']}"]) == 0
    cwd = job["root"] / "cwd-s3"
    out = _run(job, env, f"s3://{BUCKET}/run", f"s3://{BUCKET}/model", cwd)
    return {"local": local, "summary": out, "cwd": cwd}


def _read(fs, key: str, columns=None):
    return pq.read_table(key, filesystem=fs, columns=columns)


def test_a_whole_run_into_s3_equals_the_local_run(job, s3, runs):
    _, fs = s3
    local = runs["local"]
    run = f"{BUCKET}/run"
    assert "output in s3://grads-test/run" in runs["summary"]
    assert list(runs["cwd"].iterdir()) == []  # nothing written to a local folder named like the URL
    for stage in STAGES:
        assert fs.exists(f"{run}/{stage}/.ledger/SUCCESS.json"), stage
    for name in ("stats", "features"):
        remote = sorted(fs.glob(f"{run}/{name}/part-*.parquet"))
        here = sorted((local / name).glob("part-*.parquet"))
        assert [Path(r).name for r in remote] == [p.name for p in here] and here
        for r, p in zip(remote, here, strict=True):
            a, b = _read(fs, r), pq.read_table(p)
            assert a.column_names == b.column_names
            for col in a.column_names:  # bit-identical, NaN equal to NaN
                x, y = a[col].combine_chunks(), b[col].combine_chunks()
                if pa.types.is_list(x.type):
                    x, y = x.flatten(), y.flatten()
                np.testing.assert_array_equal(x.to_numpy(zero_copy_only=False), y.to_numpy(zero_copy_only=False))
    assert fs.cat_file(f"{run}/selected.jsonl") == (local / "selected.jsonl").read_bytes()
    sel = _read(fs, f"{run}/selection.parquet")
    assert sel.equals(pq.read_table(local / "selection.parquet"))
    ids = sel["id"].to_pylist()
    assert len(ids) == len(set(ids)) == job["rows"]  # every input row once (none rejected here)

    manifest = json.loads(fs.cat_file(f"{run}/manifest.json"))
    assert manifest["accounting"]["input_rows"] == job["rows"]
    assert manifest["config"]["output"] == "s3://grads-test/run"
    for key in ("manifest.json", "config.yaml"):
        text = fs.cat_file(f"{run}/{key}").decode()
        assert "testing-secret" not in text and "testing-key-id" not in text  # credentials never land there
    # the fine-tuned model was uploaded and read back by the evaluation (fetched to a node-local cache)
    assert fs.exists(f"{run}/finetune/model/model.safetensors")
    ev, ev_local = json.loads(fs.cat_file(f"{run}/eval.json")), json.loads((local / "eval.json").read_text())
    for when in ("before", "after"):
        for key in ("domain_loss", "general_loss"):
            assert ev[when][key] == pytest.approx(ev_local[when][key], rel=1e-6), (when, key)
    assert ev["after"]["domain_loss"] < ev["before"]["domain_loss"]
    report = fs.cat_file(f"{run}/selection_report.md").decode()
    assert "selection_report/distributions.png" in report and fs.exists(f"{run}/selection_report/distributions.png")


def test_a_rerun_on_s3_finishes_without_rewriting_a_stage(job, s3, runs):
    env, fs = s3
    before = {k: v for s in STAGES for k, v in _objects(fs, f"{BUCKET}/run/{s}").items()}
    assert before
    _run(job, env, f"s3://{BUCKET}/run", f"s3://{BUCKET}/model", runs["cwd"])
    after = {k: v for s in STAGES for k, v in _objects(fs, f"{BUCKET}/run/{s}").items()}
    assert after == before  # same objects, same times: every stage was found finished
