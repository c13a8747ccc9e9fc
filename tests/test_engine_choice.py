"""The engine a run scores with is decided on the model itself, by each scorer's self-check, before any
corpus row: with a rule made wrong on purpose (a test hook in the scorer actor), ``score.engine=auto``
scores one example at a time and says so in the manifest, with numbers equal to ``score.engine=loop``'s;
``score.engine=batched`` stops with one line and exit 2, no Ray traceback, no retry, nothing written."""

from __future__ import annotations

import json

import numpy as np
import pyarrow.compute as pc
import pytest

from grads_ray.cli import main
from grads_ray.gradients.scorer import TEST_HOOKS_ENV
from grads_ray.rundir import read_parts
from tests.conftest import save_tiny_model

pytestmark = pytest.mark.ray

BROKEN = "model.layers.0.mlp.down_proj.weight"


@pytest.fixture(scope="module")
def job(tmp_path_factory, tiny_tokenizer):
    from grads_ray.demo.corpus import sft_rows

    root = tmp_path_factory.mktemp("engine-choice")
    corpus = root / "corpus.jsonl"
    corpus.write_text("".join(json.dumps(r) + "\n" for r in sft_rows()[:40]))
    model = root / "model"
    save_tiny_model("llama", model, vocab=len(tiny_tokenizer))
    tiny_tokenizer.save_pretrained(model)
    return ["--model", str(model), "--data", str(corpus), "warmup.enabled=false", "data.max_length=64",
            "score.batch_size=8", "score.num_actors=1", "seed=3"]


def _score(out) -> dict:
    return json.loads((out / "manifest.json").read_text())["stages"]["score"]


def _stats(out):
    t = read_parts(sorted((out / "stats").glob("part-*.parquet")))
    return t.take(pc.sort_indices(t["id"]))


def test_the_self_check_passes_and_the_batched_engine_scores(job, ray_local, tmp_path):
    out = tmp_path / "ok"
    assert main(["score", *job, "--output", str(out)]) == 0
    info = _score(out)
    assert info["engine"] == "auto" and info["engine_used"] == ["batched"]
    (check,) = info["self_check"]
    assert check["passed"] and check["rows"] == 4 and len(set(check["tokens"])) == 4
    assert check["errors"]["statistics"] <= 1e-5 and check["seconds"] > 0


def test_auto_falls_back_to_the_loop_on_a_wrong_rule(job, ray_local, tmp_path, monkeypatch, caplog):
    loop = tmp_path / "loop"
    assert main(["score", *job, "--output", str(loop), "score.engine=loop"]) == 0
    monkeypatch.setenv(TEST_HOOKS_ENV, json.dumps({"perturb": BROKEN, "factor": 1.3}))
    out = tmp_path / "auto"
    assert main(["score", *job, "--output", str(out)]) == 0
    info = _score(out)
    assert info["engine_used"] == ["loop"]
    (check,) = info["self_check"]
    assert check["passed"] is False and check["engine"] == "loop"
    assert check["failures"][0].startswith(f"{BROKEN}: batched grad differs from autograd by 30")
    assert any("scores one example at a time" in r.getMessage() and BROKEN in r.getMessage() for r in caplog.records)
    want, got = _stats(loop), _stats(out)
    for col in ("loss", "grad_norm", "grad_max", "layer0.mlp.grad_norm"):
        np.testing.assert_array_equal(got[col].to_numpy(), want[col].to_numpy(), err_msg=col)


def test_batched_refuses_with_one_line_and_exit_2(job, ray_local, tmp_path, monkeypatch, capsys):
    monkeypatch.setenv(TEST_HOOKS_ENV, json.dumps({"perturb": BROKEN, "factor": 1.3}))
    out = tmp_path / "batched"
    assert main(["score", *job, "--output", str(out), "score.engine=batched"]) == 2
    err = capsys.readouterr().err
    lines = [x for x in err.splitlines() if x.startswith("grads-ray: error:")]
    assert len(lines) == 1, err
    assert lines[0].startswith(f"grads-ray: error: score.engine=batched: the batched engine is not exact on this "
                               f"model: {BROKEN}: batched grad differs from autograd by 30")
    assert "Traceback" not in err and "UserCodeException" not in err
    assert not list((out / "stats").glob("part-*.parquet")) if (out / "stats").exists() else True


def test_check_model_prints_the_verdict_and_refuses_like_the_job(tiny_tokenizer, tmp_path, monkeypatch, capsys):
    """``grads-ray check-model``: the verdict on a model folder without scoring a corpus, on the first
    rows of --data; a wrong rule under score.engine=batched is exit 2 with the job's one line."""
    from grads_ray.demo.corpus import sft_rows
    from tests.test_model_families import _perturb

    model = tmp_path / "model"
    save_tiny_model("llama", model, vocab=len(tiny_tokenizer))
    tiny_tokenizer.save_pretrained(model)
    data = tmp_path / "rows.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in sft_rows()[:30]))
    assert main(["check-model", "--model", str(model), "--data", str(data), "data.max_length=64"]) == 0
    out = capsys.readouterr().out
    assert "rules: embedding 1, linear 15, norm 5" in out and "4 rows of corpus" in out
    assert out.rstrip().endswith("verdict: batched (exact on this model)")
    _perturb(monkeypatch, BROKEN, 1.3)
    assert main(["check-model", "--model", str(model), "--json"]) == 0  # auto: the loop, and why
    report = json.loads(capsys.readouterr().out)
    assert report["engine"] == "loop" and report["passed"] is False and BROKEN in report["reason"]
    assert main(["check-model", "--model", str(model), "score.engine=batched"]) == 2
    got = capsys.readouterr()
    assert f"verdict: refused: score.engine=batched: the batched engine is not exact on this model: {BROKEN}" in got.out
    assert got.err.count("grads-ray: error:") == 1 and "Traceback" not in got.err
