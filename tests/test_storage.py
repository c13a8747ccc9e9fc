"""grads_ray/storage.py on a local folder and on S3 (moto's server): atomic writes, folders, copies,
listings and the node-local model cache."""

from __future__ import annotations

import os

import pyarrow as pa
import pytest

from grads_ray import storage
from grads_ray.rundir import ShardCache, StageDir, read_json, read_parts, write_json, write_parquet
from tests.conftest import BUCKET


@pytest.fixture
def s3_env(s3, monkeypatch):
    env, fs = s3
    for k, v in env.items():
        monkeypatch.setenv(k, v)
    return fs


def test_local_atomic_write_leaves_the_old_content_when_writing_fails(tmp_path):
    target = tmp_path / "a" / "x.json"
    write_json(target, {"v": 1})

    def broken(fh):
        fh.write(b"half")
        raise RuntimeError("disk gone")

    with pytest.raises(RuntimeError):
        storage.atomic_write(target, broken)
    assert read_json(target) == {"v": 1}
    assert [p.name for p in target.parent.iterdir()] == ["x.json"]  # no temporary file left


@pytest.mark.parametrize("mask", [0o022, 0o027, 0o002])
def test_written_files_get_the_mode_the_umask_gives(tmp_path, mask):
    """Atomic writes and temporary folders get an ordinary write's mode (mkstemp/mkdtemp alone give
    0600/0700: outputs another account could not read)."""
    import stat

    old = os.umask(mask)
    try:
        assert storage.umask() == mask
        write_json(tmp_path / "a.json", {"v": 1})
        write_parquet(tmp_path / "t" / "part-00000.parquet", pa.table({"x": [1]}))
        folder = storage.make_temp_dir(".tmp.", tmp_path)
        plain = tmp_path / "plain"
        plain.write_text("x")
        plain_dir = tmp_path / "plain_dir"
        plain_dir.mkdir()
    finally:
        os.umask(old)
    mode = stat.S_IMODE(plain.stat().st_mode)  # what open(path, "w") gave
    assert mode == 0o666 & ~mask
    assert stat.S_IMODE((tmp_path / "a.json").stat().st_mode) == mode
    assert stat.S_IMODE((tmp_path / "t" / "part-00000.parquet").stat().st_mode) == mode
    assert stat.S_IMODE(folder.stat().st_mode) == stat.S_IMODE(plain_dir.stat().st_mode)


def test_local_link_or_copy_shares_the_inode(tmp_path):
    src = tmp_path / "s.bin"
    src.write_bytes(b"abc")
    storage.link_or_copy(src, tmp_path / "d" / "t.bin")
    assert (tmp_path / "d" / "t.bin").read_bytes() == b"abc"
    assert os.stat(src).st_ino == os.stat(tmp_path / "d" / "t.bin").st_ino


def test_locations(tmp_path):
    assert storage.location(str(tmp_path)) == tmp_path and not storage.is_remote(storage.location(str(tmp_path)))
    assert storage.location(f"file://{tmp_path}") == tmp_path
    loc = storage.location("s3://bucket/run")
    assert storage.is_remote(loc) and str(loc / "stats") == "s3://bucket/run/stats"
    with pytest.raises(ValueError, match="Protocol not known"):
        storage.check_url("nosuch://x")


def test_stage_dir_on_s3(s3_env):
    fs = s3_env
    root = storage.location(f"s3://{BUCKET}/unit/run")
    stage = StageDir(root, "stats")
    assert stage.prepare("fp1") is False
    write_parquet(stage.part(1), pa.table({"id": ["b"], "x": [2.0]}))
    write_parquet(stage.part(0), pa.table({"id": ["a"], "x": [1.0]}))
    stage.mark_done(0, {"rows": 1})
    assert stage.is_done(0) and not stage.is_done(1)
    assert [p.name for p in stage.parts()] == ["part-00000.parquet", "part-00001.parquet"]
    assert read_parts(stage.parts(), ["id", "x"])["id"].to_pylist() == ["a", "b"]
    # an interrupted run with the same fingerprint keeps its shards; another fingerprint clears them
    assert StageDir(root, "stats").prepare("fp1") is False and stage.is_done(0)
    stage.finish("fp1", {"rows": 2})
    assert StageDir(root, "stats").prepare("fp1") is True
    assert StageDir(root, "stats").prepare("fp2") is False
    assert not stage.is_done(0) and stage.parts() == []
    assert fs.cat_file(f"{BUCKET}/unit/run/stats/.ledger/FINGERPRINT") == b"fp2"


def test_copies_and_the_shard_cache_on_s3(s3_env, tmp_path):
    fs = s3_env
    src = storage.location(f"s3://{BUCKET}/unit/tree")
    for name in ("a.txt", "sub/b.txt"):
        storage.write_bytes(src / name, name.encode())
    dst = storage.location(f"s3://{BUCKET}/unit/copy")
    storage.write_bytes(dst / "stale.txt", b"old")
    storage.copy_tree(src, dst)
    assert sorted(storage.relative(f, dst) for f in storage.files_under(dst)) == ["a.txt", "sub/b.txt"]
    assert fs.cat_file(f"{BUCKET}/unit/copy/sub/b.txt") == b"sub/b.txt"
    # between a local folder and a bucket, both ways
    storage.link_or_copy(src / "a.txt", tmp_path / "a.txt")
    storage.link_or_copy(tmp_path / "a.txt", dst / "back.txt")
    assert (tmp_path / "a.txt").read_bytes() == b"a.txt" and fs.cat_file(f"{BUCKET}/unit/copy/back.txt") == b"a.txt"
    cache = ShardCache(f"s3://{BUCKET}/unit/cache")
    assert cache.get("k") is None
    cache.put("k", {"x.bin": src / "a.txt"}, {"rows": 3})
    cache.restore("k", {"x.bin": tmp_path / "restored.bin"})
    assert cache.get("k") == {"rows": 3} and (tmp_path / "restored.bin").read_bytes() == b"a.txt"
    storage.rmtree(dst)
    assert not fs.exists(f"{BUCKET}/unit/copy")


def test_a_model_at_a_url_is_fetched_once_per_version(s3_env, tmp_path, monkeypatch):
    monkeypatch.setenv("GRADS_RAY_CACHE", str(tmp_path / "cache"))
    url = f"s3://{BUCKET}/unit/model"
    for name, data in (("config.json", b"{}"), ("model.safetensors", b"weights-1")):
        storage.write_bytes(storage.location(url) / name, data)
    first = storage.local_model(url)
    assert open(os.path.join(first, "model.safetensors"), "rb").read() == b"weights-1"
    assert storage.local_model(url) == first  # cached: the same folder
    storage.write_bytes(storage.location(url) / "model.safetensors", b"weights-2")  # rewritten in place
    second = storage.local_model(url)
    assert second != first and open(os.path.join(second, "model.safetensors"), "rb").read() == b"weights-2"
    assert storage.local_model(str(tmp_path)) == str(tmp_path)  # a local folder is read where it is
    with pytest.raises(FileNotFoundError):
        storage.local_model(f"s3://{BUCKET}/unit/no-model")


def test_upload_dir_replaces_the_remote_folder(s3_env, tmp_path):
    fs = s3_env
    dst = storage.location(f"s3://{BUCKET}/unit/up")
    storage.write_bytes(dst / "old.bin", b"x")
    (tmp_path / "m").mkdir()
    (tmp_path / "m" / "w.safetensors").write_bytes(b"w")
    storage.upload_dir(tmp_path / "m", dst)
    assert sorted(fs.ls(f"{BUCKET}/unit/up")) == [f"{BUCKET}/unit/up/w.safetensors"]
    assert [n for n, _, _ in storage.listing(dst)] == ["w.safetensors"]
