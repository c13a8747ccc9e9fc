"""Shared fixtures: tiny models built from configs and saved with save_pretrained, a tiny BPE tokenizer,
one local Ray cluster for the tests that need it, and a local S3 endpoint (moto)."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# Ray Train's controller polls its workers every 2 s (and a failed worker group is seen a poll later):
# the tests' runs take seconds, so they poll faster (read by the Ray processes these tests start)
os.environ.setdefault("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", "0.2")
os.environ.setdefault("RAY_TRAIN_PREEMPTION_POLL_INTERVAL_S", "0.5")
# the GPU's Triton kernels (gradients/fused.py) run in Triton's interpreter here: it must be chosen before
# triton is first imported
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

VOCAB = 97


def tiny_config(arch: str, vocab: int = VOCAB):
    from transformers import GPT2Config, LlamaConfig, Qwen2Config

    if arch == "llama":
        return LlamaConfig(vocab_size=vocab, hidden_size=16, intermediate_size=24, num_hidden_layers=2,
                           num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128)
    if arch == "qwen2":
        return Qwen2Config(vocab_size=vocab, hidden_size=16, intermediate_size=24, num_hidden_layers=2,
                           num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128)
    if arch == "gpt2":  # tied embedding / head, Conv1D layers, learned positions, biases
        return GPT2Config(vocab_size=vocab, n_embd=16, n_layer=2, n_head=4, n_positions=128,
                          resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)
    raise ValueError(arch)


def save_tiny_model(arch: str, path, vocab: int = VOCAB, seed: int = 0):
    """Build a tiny model from its config, save it (safetensors), load it back the real way."""
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(tiny_config(arch, vocab))
    model.save_pretrained(path)
    return AutoModelForCausalLM.from_pretrained(path)


def record_progress(monkeypatch) -> list[tuple[str, str, int]]:
    """Every progress update from now on, as (stage, unit, n); the progress lines still print."""
    from grads_ray.progress import Progress

    updates: list[tuple[str, str, int]] = []
    real = Progress.update
    monkeypatch.setattr(Progress, "update", lambda self, n=1: (updates.append((self.stage, self.unit, n)), real(self, n)))
    return updates


def assert_one_table(folder, rows: int | None = None) -> None:
    """``folder`` reads as one table with one schema, as a user would read it: pandas, pyarrow's
    dataset, DuckDB and Hugging Face ``datasets`` (offline, cache in the folder's parent)."""
    import duckdb
    import pandas as pd
    import pyarrow.dataset as pads
    import pyarrow.parquet as pq

    parts = sorted(folder.glob("*.parquet"))
    assert parts, folder
    schemas = {pq.read_schema(p).remove_metadata().to_string(show_field_metadata=True) for p in parts}
    assert len(schemas) == 1, f"{folder}: {len(schemas)} schemas among {len(parts)} parts"
    n = pads.dataset(str(folder)).to_table().num_rows
    assert len(pd.read_parquet(folder)) == n
    with duckdb.connect() as con:
        assert con.execute(f"SELECT count(*) FROM read_parquet('{folder}/*.parquet')").fetchall() == [(n,)]
    import datasets

    got = datasets.load_dataset("parquet", data_dir=str(folder), split="train",
                                cache_dir=str(folder.parent / f".hf-cache-{folder.name}"))
    assert got.num_rows == n
    if rows is not None:
        assert n == rows


@pytest.fixture(scope="session")
def tiny_tokenizer(tmp_path_factory):
    """A BPE tokenizer trained on Python's own docs, with the fallback chat template."""
    from grads_ray.demo.corpus import sft_rows
    from grads_ray.demo.model import train_tokenizer

    texts = [r["prompt"] + "\n" + r["response"] for r in sft_rows()[:400]]
    tok = train_tokenizer(texts, vocab_size=400)
    return tok


@pytest.fixture(scope="session")
def ray_local():
    import ray

    if not ray.is_initialized():
        ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False,
                 runtime_env={"env_vars": {"HF_HUB_OFFLINE": "1", "TRANSFORMERS_VERBOSITY": "error"}})
        ctx = ray.data.DataContext.get_current()
        ctx.enable_progress_bars = False
    yield ray
    ray.shutdown()


BUCKET = "grads-test"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="session")
def s3(tmp_path_factory):
    """A moto S3 server on 127.0.0.1 with one bucket (``BUCKET``). -> (the environment a driver needs:
    endpoint and credentials; an s3fs client). Skipped where moto or s3fs is not installed."""
    pytest.importorskip("moto")
    s3fs = pytest.importorskip("s3fs")
    port = _free_port()
    log = open(tmp_path_factory.mktemp("moto") / "moto.log", "w")  # noqa: SIM115 - open while it runs
    proc = subprocess.Popen([sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
                            stdout=log, stderr=subprocess.STDOUT)
    env = {"AWS_ENDPOINT_URL": f"http://127.0.0.1:{port}", "AWS_ACCESS_KEY_ID": "testing-key-id",
           "AWS_SECRET_ACCESS_KEY": "testing-secret", "AWS_DEFAULT_REGION": "us-east-1"}
    deadline = time.time() + 60
    while True:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            break
        except OSError:
            if time.time() > deadline or proc.poll() is not None:
                proc.kill()
                pytest.fail("moto's S3 server did not start")
            time.sleep(0.2)
    fs = s3fs.S3FileSystem(key=env["AWS_ACCESS_KEY_ID"], secret=env["AWS_SECRET_ACCESS_KEY"],
                           endpoint_url=env["AWS_ENDPOINT_URL"], skip_instance_cache=True,
                           use_listings_cache=False)
    fs.mkdir(BUCKET)
    yield env, fs
    proc.terminate()
    try:
        proc.wait(timeout=30)
    except subprocess.TimeoutExpired:  # a loaded machine: do not fail the session over the server's exit
        proc.kill()
        proc.wait()
    log.close()
