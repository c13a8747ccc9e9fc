"""benchmarks/bergson_peer.py: runs where bergson is not importable (its side skipped, the JSON says so),
and, where bergson is installed, agrees with it exactly on the projected linear-layer gradients."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "benchmarks" / "bergson_peer.py"
ARGS = ["--quick", "--n", "16", "--repeats", "1", "--threads", "1", "--device", "cpu"]


def run(env: dict) -> tuple[dict, str]:
    res = subprocess.run([sys.executable, str(SCRIPT), *ARGS], capture_output=True, text=True, timeout=240,
                         cwd=ROOT, env={**os.environ, **env})
    assert res.returncode == 0, res.stderr[-3000:]
    return json.loads(res.stdout.strip().splitlines()[-1]), res.stdout


def test_without_bergson(tmp_path):
    # a `bergson` that fails to import, ahead of any installed one: the path a machine without it takes
    (tmp_path / "bergson").mkdir()
    (tmp_path / "bergson" / "__init__.py").write_text("raise ImportError('hidden by the test')\n")
    out, stdout = run({"PYTHONPATH": os.pathsep.join([str(tmp_path), os.environ.get("PYTHONPATH", "")])})
    assert out["bergson"] is None and out["bergson_examples_per_s"] is None and out["speedup_vs_bergson"] is None
    assert "hidden by the test" in out["bergson_skipped"]
    assert "pip install bergson==2.5.1" in stdout  # the one line that says how to get its side
    assert out["grads_ray_examples_per_s"] > 0 and out["plain_step_examples_per_s"] > 0
    assert out["grads_ray_cost_vs_plain_step"] > 0
    assert (out["model"], out["n"], out["batch"], out["device"]) == ("tiny", 16, 8, "cpu")
    assert set(out["computes"]) == {"bergson", "grads_ray", "plain_step"}
    assert out["exactness"] is None


def test_with_bergson_exact():
    pytest.importorskip("bergson")
    out, _ = run({})
    assert out["bergson"]["modules"] > 0 and out["bergson_examples_per_s"] > 0 and out["speedup_vs_bergson"] > 0
    check = out["exactness"]
    assert check["modules"] == out["bergson"]["modules"] and check["agree"], check
