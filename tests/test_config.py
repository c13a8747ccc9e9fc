from __future__ import annotations

from pathlib import Path

import pytest

from grads_ray.config import Config, ConfigError, load_config, parse_override

ROOT = Path(__file__).resolve().parents[1]


def test_defaults_and_overrides():
    cfg = load_config(None, ["select.budget=10%", "data.max_length=128", "data.paths=[a.jsonl, b]",
                             "select.grads.w_loss=0.5", "ray.address=auto"])
    assert isinstance(cfg, Config)
    assert cfg.select.budget == "10%" and cfg.data.max_length == 128
    assert [Path(p).name for p in cfg.data.paths] == ["a.jsonl", "b"] and cfg.select.grads.w_loss == 0.5
    assert cfg.ray.address == "auto" and cfg.warmup.fraction == 0.2


def test_a_partial_section_keeps_that_sections_own_defaults(tmp_path):
    """warmup and finetune are both TrainConfig, with different defaults (fraction 0.2, epochs 2):
    setting one key of a section must not reset its others to TrainConfig's (a bug until 2026-11-24:
    ``warmup.lr=...`` made the warm-up train on the whole corpus)."""
    plain = load_config(None, [])
    assert (plain.warmup.fraction, plain.warmup.epochs, plain.finetune.epochs) == (0.2, 1, 2)
    cfg = load_config(None, ["warmup.lr=0.1", "finetune.batch_size=4"])
    assert (cfg.warmup.fraction, cfg.warmup.lr, cfg.finetune.epochs, cfg.finetune.batch_size) == (0.2, 0.1, 2, 4)
    path = tmp_path / "c.yaml"
    path.write_text("finetune:\n  lora:\n    r: 4\nwarmup:\n  epochs: 3\n")
    cfg = load_config(path, [])
    assert (cfg.finetune.epochs, cfg.finetune.lora.r, cfg.finetune.lora.alpha) == (2, 4, 16.0)
    assert (cfg.warmup.fraction, cfg.warmup.epochs) == (0.2, 3)


def test_yaml_then_overrides(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("seed: 3\nselect:\n  budget: 500\n")
    cfg = load_config(path, ["seed=4"])
    assert cfg.seed == 4 and cfg.select.budget == "500"


@pytest.mark.parametrize("override,match", [
    ("select.bugdet=5%", "unknown config key select.bugdet"),
    ("data.max_length=long", "data.max_length: expected an integer"),
    ("data.strict=yes please", "expected true or false"),
    ("select.budget=150%", "select.budget"),
    ("data.on_long=drop", "data.on_long"),
    ("select.method=magic", "select.method"),
    ("select.method=less", "select.less.target_paths"),
    ("select.grads.k=wide", "select.grads.k must be a number or auto"),
    ("select.grads.k=0", "select.grads.k must be > 0"),
    ("select.grads.directions={grad_norm: up}", "select.grads.directions.grad_norm"),
    ("select.grads.region=middle", "select.grads.region"),
    ("select.quotas=[a, b]", "select.quotas: expected a mapping"),
    ("select.quotas={a: lots}", "select.quotas.a: expected a number"),
    ("select.fisher.epsilon=1", "select.fisher.epsilon"),
    ("similarity.index=hnsw", "similarity.index"),
    ("similarity.eps=3", "similarity.eps"),
    ("score.chunk_elements=0", "score.chunk_elements must be auto or an integer >= 1"),
    ("score.chunk_elements=big", "score.chunk_elements must be auto or an integer >= 1"),
    ("deterministic=sometimes", "expected true or false"),
    ("nokey", "not of the form"),
])
def test_bad_config_names_the_key(override, match):
    with pytest.raises(ConfigError, match=match):
        load_config(None, [override])


def test_chunk_elements_auto_is_by_device():
    from grads_ray.gradients.memory import chunk_elements

    assert load_config(None, []).score.chunk_elements == "auto"
    assert load_config(None, ["score.chunk_elements=1024"]).score.chunk_elements == 1024
    assert chunk_elements("auto", "cpu") == 1 << 26
    assert chunk_elements("auto", "cuda", total_bytes=141 * 2**30) == 1 << 28  # an H200: measured there
    assert chunk_elements("auto", "cuda", total_bytes=24 * 2**30) == 1 << 26  # a small card keeps the old bound
    assert chunk_elements(1024, "cuda") == 1024


def test_selection_keys_read_from_overrides():
    cfg = load_config(None, ["select.method=fisher", "select.grads.k=auto", "select.fisher.epsilon=0.05",
                             "select.quotas={law.jsonl: 0.5, '*': 0.5}", "select.grads.directions={signal: upper}"])
    assert cfg.select.method == "fisher" and cfg.select.grads.k == "auto" and cfg.select.fisher.epsilon == "0.05"
    assert cfg.select.quotas == {"law.jsonl": 0.5, "*": 0.5} and cfg.select.grads.directions == {"signal": "upper"}


def test_parse_override_reads_yaml_values():
    assert parse_override("a.b=1") == {"a": {"b": 1}}
    assert parse_override("a=[1, 2]") == {"a": [1, 2]}


def test_every_shipped_yaml_loads():
    files = sorted((ROOT / "grads_ray" / "configs").glob("*.yaml")) + sorted((ROOT / "jobs").rglob("*.yaml"))
    assert files
    for f in files:
        load_config(f)


def test_local_paths_become_absolute(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    cfg = load_config(None, ["model.path=m", "data.paths=[a.jsonl, 'file:///data/x']", "output=out",
                             "eval.general_paths=[~/g.txt]"])
    assert cfg.model.path == str(tmp_path / "m") and cfg.output == str(tmp_path / "out")
    assert cfg.data.paths == [str(tmp_path / "a.jsonl"), "/data/x"]
    assert cfg.eval.general_paths == [str(Path("~/g.txt").expanduser())]


def test_job_entrypoint_loads_from_a_bare_checkout():
    """jobs/run.py must import the package from the uploaded working dir and reach the CLI."""
    import subprocess
    import sys

    out = subprocess.run([sys.executable, str(ROOT / "jobs" / "run.py"), "--help"], capture_output=True,
                         text=True, cwd=ROOT / "jobs", timeout=120)
    assert out.returncode == 0 and "grads-ray" in out.stdout


def test_a_missing_or_broken_config_file_is_named(tmp_path):
    with pytest.raises(ConfigError, match="select.budget=5%: no such config file"):
        load_config("select.budget=5%")  # an override where the config file goes
    bad = tmp_path / "job.yaml"
    bad.write_text("select:\n  budget: [5%,\nseed: 1\n")
    with pytest.raises(ConfigError, match=r"job.yaml:4: not valid YAML"):
        load_config(bad)


@pytest.mark.parametrize("key", ["data.paths", "eval.domain_paths", "eval.general_paths", "select.less.target_paths"])
def test_a_missing_input_path_fails_before_ray_with_its_key(tmp_path, key, capsys):
    from grads_ray.cli import main
    from tests.conftest import save_tiny_model

    save_tiny_model("gpt2", tmp_path / "m")
    (tmp_path / "c.jsonl").write_text('{"prompt": "p", "response": "r"}\n')
    args = ["score", "--model", str(tmp_path / "m"), "--output", str(tmp_path / "o")]
    if key != "data.paths":
        args += ["--data", str(tmp_path / "c.jsonl")]
    assert main([*args, f"{key}=[{tmp_path / 'gone.jsonl'}]"]) == 2
    assert f"{key}: {tmp_path / 'gone.jsonl'}: no such file or folder" in capsys.readouterr().err
    assert not (tmp_path / "o").exists()  # nothing started, nothing written


def test_file_urls_are_local_paths_object_store_urls_where_supported(tmp_path):
    cfg = load_config(None, [f"output=file://{tmp_path}/out", f"data.paths=[file://{tmp_path}/c.jsonl]"])
    assert cfg.output == str(tmp_path / "out") and cfg.data.paths == [str(tmp_path / "c.jsonl")]
    cfg = load_config(None, ["output=s3://bucket/run", "score.model=s3://bucket/m", "model.path=s3://b/base"])
    assert cfg.output == "s3://bucket/run" and cfg.score.model == "s3://bucket/m"  # left as they are
    with pytest.raises(ConfigError, match="data.paths: s3://bucket/c.jsonl: input files are read from local paths"):
        load_config(None, ["data.paths=[s3://bucket/c.jsonl]"])
    with pytest.raises(ConfigError, match="output: nosuch://x/run: Protocol not known: nosuch"):
        load_config(None, ["output=nosuch://x/run"])


def test_yaml_booleans_in_string_settings_keep_their_spelling():
    cfg = load_config(None, ["finetune.use_gpu=false", "score.use_gpu=true", "select.dedup=false"])
    assert (cfg.finetune.use_gpu, cfg.score.use_gpu, cfg.select.dedup) == ("false", "true", "false")
