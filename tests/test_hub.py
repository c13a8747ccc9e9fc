"""Models named by Hub id (``org/name[@revision]``), offline, from a Hugging Face cache laid out as the
Hub client lays it out (``models--org--name/refs``, ``snapshots/<commit>``, ``blobs``): pinned to a
commit when the config is loaded, fetched per node from that cache, the commit in the manifest and
the fingerprints. Nothing is downloaded."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from grads_ray import hub, storage
from grads_ray.config import ConfigError, load_config
from tests.conftest import save_tiny_model

COMMIT_A = "a" * 40
COMMIT_B = "0123456789abcdef0123456789abcdef01234567"


def fill_cache(cache: Path, repo: str, commit: str, model_dir: Path, ref: str | None = "main") -> Path:
    """Put ``model_dir``'s files into ``cache`` as the Hub client stores a download: content in
    ``blobs/``, ``snapshots/<commit>/<file>`` linking to it, ``refs/<ref>`` naming the commit."""
    root = cache / f"models--{repo.replace('/', '--')}"
    snap = root / "snapshots" / commit
    snap.mkdir(parents=True, exist_ok=True)
    (root / "blobs").mkdir(exist_ok=True)
    for f in model_dir.iterdir():
        blob = root / "blobs" / f"{commit[:8]}-{f.name}"
        blob.write_bytes(f.read_bytes())
        link = snap / f.name
        if not link.exists():
            link.symlink_to(os.path.relpath(blob, snap))
    if ref:
        (root / "refs").mkdir(exist_ok=True)
        (root / "refs" / ref).write_text(commit)
    return snap


@pytest.fixture
def hub_cache(tmp_path, monkeypatch, tiny_tokenizer):
    model = tmp_path / "tiny"
    save_tiny_model("llama", model, vocab=len(tiny_tokenizer))
    tiny_tokenizer.save_pretrained(model)
    cache = tmp_path / "hf" / "hub"
    fill_cache(cache, "org/tiny", COMMIT_A, model)
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.delenv("GRADS_RAY_HF_HUB_OFFLINE", raising=False)
    monkeypatch.chdir(tmp_path)
    hub._snapshot.cache_clear()
    return {"cache": cache, "model": model}


def test_ids_are_told_from_folders(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert hub.is_hub_id("Qwen/Qwen3-0.6B") and hub.is_hub_id("org/name@v1.0") and hub.is_hub_id("hf://org/name")
    assert hub.parse("Qwen/Qwen3-0.6B@main") == ("Qwen/Qwen3-0.6B", "main")
    (tmp_path / "org" / "name").mkdir(parents=True)
    for folder in ("org/name", "./org/name", "/models/m", "models/a/b", "s3://b/m", "m", ""):
        assert not hub.is_hub_id(folder), folder


def test_a_hub_id_is_pinned_to_its_commit_and_loads(hub_cache):
    from transformers import AutoModelForCausalLM

    cfg = load_config(None, ["model.path=org/tiny", "output=out"])
    assert cfg.model.path == f"hf://org/tiny@{COMMIT_A}"
    folder = storage.local_model(cfg.model.path)
    assert Path(folder).name == COMMIT_A and (Path(folder) / "config.json").is_file()
    assert AutoModelForCausalLM.from_pretrained(folder).config.model_type == "llama"
    assert load_config(None, [f"model.path=org/tiny@{COMMIT_B}"]).model.path == f"hf://org/tiny@{COMMIT_B}"


def test_a_moved_branch_pins_anew_a_pinned_revision_does_not(hub_cache):
    fill_cache(hub_cache["cache"], "org/tiny", COMMIT_B, hub_cache["model"], ref="v1")
    assert load_config(None, ["model.path=org/tiny@v1"]).model.path == f"hf://org/tiny@{COMMIT_B}"
    before = load_config(None, ["model.path=org/tiny"]).model.path
    fill_cache(hub_cache["cache"], "org/tiny", COMMIT_B, hub_cache["model"], ref="main")  # main moves
    hub._snapshot.cache_clear()
    assert before.endswith(COMMIT_A) and load_config(None, ["model.path=org/tiny"]).model.path.endswith(COMMIT_B)


def test_a_model_missing_from_the_cache_is_one_clear_error(hub_cache):
    with pytest.raises(ConfigError, match=r"^score.model: org/absent@main: not found in the Hugging Face cache .*"
                                          r"HF_HUB_OFFLINE is set"):
        load_config(None, ["score.model=org/absent"])


def test_the_job_scores_a_hub_model_and_records_its_commit(hub_cache, tmp_path):
    """The CLI in its own process (its own local Ray, whose workers get the user's Hub settings)."""
    from grads_ray.demo.corpus import sft_rows

    data = tmp_path / "rows.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in sft_rows()[:24]))
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    out = tmp_path / "run"
    res = subprocess.run([sys.executable, "-m", "grads_ray", "score", "--model", "org/tiny", "--data", str(data),
                          "--output", str(out), "warmup.enabled=false", "data.max_length=64", "score.batch_size=8"],
                         env=env, capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stderr[-3000:]
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["config"]["model"]["path"] == f"hf://org/tiny@{COMMIT_A}"
    assert "org/tiny" in (out / "config.yaml").read_text()
