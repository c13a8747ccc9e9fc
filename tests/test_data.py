"""Row shapes, readers (JSONL, Parquet, saved datasets), shard plans, and prompt masking."""

from __future__ import annotations

import json

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from grads_ray.data.formats import IGNORE_INDEX, RowError, normalize, row_id
from grads_ray.data.readers import InputError, plan_shards, read_shard, validate_rows
from grads_ray.data.tokenize import FALLBACK_CHAT_TEMPLATE, encode, encode_chat


@pytest.mark.parametrize("row,kind", [
    ({"prompt": "p", "response": "r"}, "pair"),
    ({"prompt": "p", "completion": "r"}, "pair"),
    ({"instruction": "i", "input": "x", "output": "o"}, "pair"),
    ({"instruction": "i", "output": "o"}, "pair"),
    ({"messages": [{"role": "user", "content": "u"}, {"role": "assistant", "content": "a"}]}, "chat"),
    ({"input_ids": [1, 2, 3], "labels": [-100, 2, 3]}, "tokens"),
])
def test_accepted_shapes(row, kind):
    assert normalize(row).kind == kind


def test_alpaca_prompt_joins_instruction_and_input():
    ex = normalize({"instruction": "Translate.", "input": "hola", "output": "hello"})
    assert ex.prompt == "Translate.\n\nhola" and ex.response == "hello"


@pytest.mark.parametrize("row,reason", [
    ({"prompt": "p"}, "missing_field:response"),
    ({"prompt": "p", "response": 3}, "wrong_type:response"),
    ({"prompt": "p", "response": "   "}, "empty_response"),
    ({"prompt": "", "response": "r"}, "empty_prompt"),
    ({"instruction": "i", "output": ""}, "empty_output"),
    ({"messages": [{"role": "user", "content": "u"}]}, "empty_response"),
    ({"messages": [{"role": "robot", "content": "u"}]}, "bad_role"),
    ({"messages": "hi"}, "wrong_type:messages"),
    ({"input_ids": [1, 2], "labels": [1]}, "length_mismatch"),
    ({"input_ids": [1, 2], "labels": [-100, -100]}, "empty_response"),
    ({"input_ids": [1, "a"]}, "wrong_type:input_ids"),
    ({"text": "x"}, "unknown_format"),
    ([1, 2], "not_an_object"),
])
def test_rejects_name_the_reason(row, reason):
    with pytest.raises(RowError) as err:
        normalize(row)
    assert err.value.reason == reason


def test_row_id_kept_or_derived():
    assert row_id({"id": 7}, "f:1") == "7"
    assert row_id({"prompt": "p"}, "f:1") == "f:1"
    with pytest.raises(RowError):
        row_id({"id": [1]}, "f:1")


def _write_jsonl(path, lines: list[bytes]):
    path.write_bytes(b"\n".join(lines))


def test_bad_jsonl_rows_are_rejected_with_file_and_line(tmp_path):
    good = json.dumps({"prompt": "p", "response": "r"}).encode()
    _write_jsonl(tmp_path / "c.jsonl", [good, b"{not json", b"", good, b"\xff\xfe bad bytes",
                                        json.dumps({"prompt": "p"}).encode(), b'{"prompt": "p", "resp'])
    out = [r for s in plan_shards([str(tmp_path / "c.jsonl")], 1 << 20, 100) for r in validate_rows(read_shard(s))]
    by_line = {r["line"]: r for r in out}
    assert sorted(by_line) == [1, 2, 4, 5, 6, 7]  # the blank line 3 is no row
    assert by_line[1]["id"] == "c.jsonl:1" and "record" in by_line[1]
    assert by_line[2]["reason"] == "bad_json"
    assert by_line[5]["reason"] == "bad_utf8"
    assert by_line[6]["reason"] == "missing_field:response"
    assert by_line[7]["reason"] == "bad_json"  # truncated last line


@pytest.mark.parametrize("shard_bytes", [1, 7, 50, 10_000])
@pytest.mark.parametrize("shard_rows", [100, 6])
@pytest.mark.parametrize("limit", [None, 13])
def test_shards_cover_every_line_once(tmp_path, shard_bytes, shard_rows, limit):
    lines = [json.dumps({"prompt": f"p{i}", "response": "r" * (i % 5 + 1)}).encode() for i in range(40)]
    _write_jsonl(tmp_path / "a.jsonl", lines)
    (tmp_path / "sub").mkdir()
    _write_jsonl(tmp_path / "sub" / "b.jsonl", lines[:9])
    shards = plan_shards([str(tmp_path)], shard_bytes, shard_rows, limit)
    sizes = [sum(1 for _ in read_shard(s)) for s in shards]
    assert max(sizes) <= shard_rows  # rows bound a JSONL shard too, whatever its bytes
    assert [s.index for s in shards] == list(range(len(shards)))
    seen = [(r.source, r.line) for s in shards for r in read_shard(s)]
    expected = [("a.jsonl", i + 1) for i in range(40)] + [("sub/b.jsonl", i + 1) for i in range(9)]
    assert seen == expected[:limit] if limit else seen == expected


def test_parquet_and_saved_dataset(tmp_path):
    import datasets

    rows = [{"prompt": f"p{i}", "response": f"r{i}"} for i in range(10)]
    pq.write_table(pa.Table.from_pylist(rows), tmp_path / "c.parquet")
    datasets.Dataset.from_list(rows).save_to_disk(str(tmp_path / "saved"))
    for path, name in ((tmp_path / "c.parquet", "c.parquet"), (tmp_path / "saved", "saved")):
        shards = plan_shards([str(path)], 1, 3)
        assert len(shards) == 4
        got = [r for s in shards for r in validate_rows(read_shard(s))]
        assert [r["id"] for r in got] == [f"{name}:{i + 1}" for i in range(10)]
        assert json.loads(got[4]["record"]) == rows[4]


def test_missing_or_unknown_input_is_a_clear_error(tmp_path):
    with pytest.raises(InputError, match="no such file"):
        plan_shards([str(tmp_path / "nope.jsonl")], 100, 100)
    (tmp_path / "x.csv").write_text("a,b\n")
    with pytest.raises(InputError, match="unknown file kind"):
        plan_shards([str(tmp_path / "x.csv")], 100, 100)


def test_pair_masks_prompt(tiny_tokenizer):
    ex = normalize({"prompt": "Explain `json.dumps`.", "response": "Serialize obj to a JSON formatted str."})
    ids, labels = encode(ex, tiny_tokenizer, 512, "truncate")
    assert len(ids) == len(labels)
    learned = [t for t, lab in zip(ids, labels, strict=True) if lab != IGNORE_INDEX]
    assert tiny_tokenizer.decode(learned) == ex.response + tiny_tokenizer.eos_token
    assert labels[0] == IGNORE_INDEX and ids[0] == tiny_tokenizer.bos_token_id


def test_chat_masks_everything_but_assistant_turns(tiny_tokenizer):
    msgs = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "What is a list?"},
            {"role": "assistant", "content": "A mutable sequence."}, {"role": "user", "content": "And a tuple?"},
            {"role": "assistant", "content": "An immutable one."}]
    ids, labels = encode_chat(msgs, tiny_tokenizer)
    learned = tiny_tokenizer.decode([t for t, lab in zip(ids, labels, strict=True) if lab != IGNORE_INDEX])
    eos = tiny_tokenizer.eos_token
    assert learned == f"A mutable sequence.{eos}\nAn immutable one.{eos}\n"


def test_chat_without_template_uses_fallback(tiny_tokenizer):
    import copy

    tok = copy.deepcopy(tiny_tokenizer)
    tok.chat_template = None
    msgs = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello."}]
    assert encode_chat(msgs, tok) == encode_chat(msgs, tiny_tokenizer)
    assert tiny_tokenizer.chat_template == FALLBACK_CHAT_TEMPLATE


def test_long_rows_truncate_or_reject(tiny_tokenizer):
    ex = normalize({"prompt": "short", "response": "word " * 200})
    ids, labels = encode(ex, tiny_tokenizer, 32, "truncate")
    assert len(ids) == 32 and len(labels) == 32
    with pytest.raises(RowError) as err:
        encode(ex, tiny_tokenizer, 32, "reject")
    assert err.value.reason == "too_long"
    long_prompt = normalize({"prompt": "word " * 200, "response": "ok"})
    with pytest.raises(RowError) as err:
        encode(long_prompt, tiny_tokenizer, 32, "truncate")
    assert err.value.reason == "empty_response"


def test_pretokenized_rows_need_no_tokenizer():
    ex = normalize({"input_ids": [5, 6, 7, 8], "labels": [-100, -100, 7, 8]})
    assert encode(ex, None, 16, "truncate") == ([5, 6, 7, 8], [-100, -100, 7, 8])
    with pytest.raises(RowError, match="no_tokenizer"):
        encode(normalize({"prompt": "p", "response": "r"}), None, 16, "truncate")


def test_scorer_batches_depend_only_on_the_unit():
    """Engine batches: per (shard, unit) sorted by (length, pos), cut every batch_size, rejected rows
    left out; the same whether the units arrive in one block or several, in any order."""
    from types import SimpleNamespace

    import numpy as np

    from grads_ray.gradients.scorer import Scorer

    rng = np.random.default_rng(0)
    rows = [(s, p, int(rng.integers(1, 30)), "too_long" if (s, p) == (1, 2) else "")
            for s in (0, 1) for p in range(10)]

    def block(items):
        return {"shard": np.array([r[0] for r in items]), "pos": np.array([r[1] for r in items]),
                "input_ids": [np.zeros(r[2]) for r in items], "reason": np.array([r[3] for r in items], object)}

    def as_keys(items, groups):
        return sorted(tuple((items[i][0], items[i][1]) for i in g) for g in groups)

    cfg = SimpleNamespace(batch_size=3, unit_rows=4)
    whole = as_keys(rows, Scorer.batches(cfg, block(rows)))
    units = [[r for r in rows if (r[0], r[1] // 4) == key] for key in sorted({(r[0], r[1] // 4) for r in rows})]
    pieces = []
    for chunk in (units[3:] + units[:3], ):  # units out of order, split over blocks
        for k in range(0, len(chunk), 2):
            items = [r for u in chunk[k:k + 2] for r in u]
            pieces += as_keys(items, Scorer.batches(cfg, block(items)))
    assert sorted(pieces) == whole
    assert (1, 2) not in {key for g in whole for key in g}
    assert sum(len(g) for g in whole) == len(rows) - 1
    length = {(r[0], r[1]): r[2] for r in rows}
    for g in whole:
        assert len({(s, p // 4) for s, p in g}) == 1 and len(g) <= 3
        assert [length[k] for k in g] == sorted(length[k] for k in g)


def test_duplicate_ids_across_shards_keep_the_first_row(tmp_path):
    from grads_ray.data.readers import plan_shards
    from grads_ray.rundir import StageDir, read_parts
    from grads_ray.stages.ingest_tasks import drop_duplicate_ids, ingest_shard

    ids = ["a", "b", "c", "a", "d", "b", "e", "a"]
    data = tmp_path / "c.jsonl"
    data.write_text("".join(json.dumps({"id": i, "prompt": f"p{n}", "response": f"r{n}"}) + "\n"
                            for n, i in enumerate(ids)))
    shards = plan_shards([str(data)], 80, 1000)
    assert len(shards) >= 3
    stage = StageDir(tmp_path, "rows")
    for s in shards:
        ingest_shard(s, str(stage.path))
    assert drop_duplicate_ids(shards, stage) == 3
    assert drop_duplicate_ids(shards, stage) == 0  # idempotent: an interrupted ingest may run it again
    rows = read_parts(stage.parts())
    assert sorted(zip(rows["id"].to_pylist(), rows["line"].to_pylist(), strict=True)) == [("a", 1), ("b", 2), ("c", 3), ("d", 5), ("e", 7)]
    rejected = [json.loads(x) for p in stage.reject_parts() for x in p.read_text().splitlines()]
    assert sorted((r["line"], r["reason"], r["detail"]) for r in rejected) == [
        (4, "duplicate_id", "first seen at c.jsonl:1"), (6, "duplicate_id", "first seen at c.jsonl:2"),
        (8, "duplicate_id", "first seen at c.jsonl:1")]
    assert sum(stage.done_info(s.index)["rows"] for s in shards) == 5


def _dedup_corpus(tmp_path, seed: int):
    """A random small corpus for drop_duplicate_ids, ingested: two files cut into shards of odd
    sizes, ids drawn from a small pool (repeats within a shard, across shards and across files;
    multi-byte UTF-8 among them), one row in eight bad (so some shards have rejects already, some
    none, some no row at all). -> (shards, stage, [(source, line, id, good)] in input order)."""
    import numpy as np

    from grads_ray.rundir import StageDir
    from grads_ray.stages.ingest_tasks import ingest_shard

    tmp_path.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    pool = [f"module.Class{k % 4}.method@{k}" if k % 3 else f"id-é{k}" for k in range(int(rng.integers(5, 30)))]
    rows, paths = [], []
    for name, n in (("a.jsonl", int(rng.integers(1, 53))), ("b.jsonl", int(rng.integers(1, 37)))):
        lines = []
        for line in range(1, n + 1):
            rid, good = pool[int(rng.integers(len(pool)))], bool(rng.random() >= 0.125)
            lines.append(json.dumps({"id": rid, "prompt": f"p{line}", "response": "r" if good else ""}))
            rows.append((name, line, rid, good))
        (tmp_path / name).write_text("".join(x + "\n" for x in lines))
        paths.append(str(tmp_path / name))
    shards = plan_shards(paths, 1 << 20, int(rng.choice([1, 3, 5, 7, 11, 1000])))
    stage = StageDir(tmp_path, "rows")
    for s in shards:
        ingest_shard(s, str(stage.path))
    return shards, stage, rows


def _dedup_files(stage) -> dict[str, tuple[bytes, int]]:
    """Every file of a stage folder (parts, rejects, markers) -> its bytes and inode (a rewrite, a
    temporary file renamed over it, gives a new inode even with the same bytes)."""
    return {str(p.relative_to(stage.path)): (p.read_bytes(), p.stat().st_ino)
            for p in sorted(stage.path.rglob("*")) if p.is_file()}


def _check_dedup_against_reference(shards, stage, rows) -> int:
    """drop_duplicate_ids against a plain reference (a dict of each id's first good row in input
    order): the same rows moved, with the same reject records, parts and markers; a second run moves
    and rewrites nothing. -> rows moved."""
    from grads_ray.rundir import read_parts
    from grads_ray.stages.ingest_tasks import drop_duplicate_ids, rows_digest

    first, moved = {}, {}
    for source, line, rid, good in rows:
        if good and rid in first:
            moved[(source, line)] = (rid, f"first seen at {first[rid]}")
        elif good:
            first[rid] = f"{source}:{line}"
    assert drop_duplicate_ids(shards, stage) == len(moved)
    kept = read_parts(stage.parts())
    assert sorted(zip(kept["source"].to_pylist(), kept["line"].to_pylist(), kept["id"].to_pylist(), strict=True)) == \
        sorted((s, n, i) for s, n, i, good in rows if good and (s, n) not in moved)
    rejected = [json.loads(x) for p in stage.reject_parts() for x in p.read_text().splitlines()]
    assert {(r["source"], r["line"]): (r["id"], r["detail"]) for r in rejected if r["reason"] == "duplicate_id"} == moved
    assert sorted((r["source"], r["line"]) for r in rejected if r["reason"] != "duplicate_id") == \
        sorted((s, n) for s, n, _, good in rows if not good)
    for s in shards:
        part = pq.read_table(str(stage.part(s.index)))
        mine = [json.loads(x) for x in stage.rejects(s.index).read_text().splitlines()]
        info = stage.done_info(s.index)
        assert [r["line"] for r in mine] == sorted(r["line"] for r in mine)
        assert (info["rows"], info["rejected"]) == (part.num_rows, len(mine))
        # ingest's marker names the first reject without its "stage" (one it rewrote here, with it)
        assert (info["first_reject"] or {}) | {"stage": "ingest"} == (mine[0] if mine else {"stage": "ingest"})
        assert info["content"] == rows_digest(part)
    before = _dedup_files(stage)
    assert drop_duplicate_ids(shards, stage) == 0  # idempotent: an interrupted ingest may run it again
    assert _dedup_files(stage) == before  # and nothing is rewritten
    return len(moved)


@pytest.mark.parametrize("seed", range(16))
def test_duplicate_ids_are_moved_as_a_plain_reference_says(tmp_path, seed):
    shards, stage, rows = _dedup_corpus(tmp_path, seed)
    _check_dedup_against_reference(shards, stage, rows)


def test_the_random_dedup_corpora_hold_duplicates_within_and_across_shards(tmp_path):
    """The reference test above checks something: its corpora do hold both kinds of duplicate."""
    kinds = set()
    for seed in range(16):
        shards, _, rows = _dedup_corpus(tmp_path / str(seed), seed)
        at: dict[str, list[int]] = {}
        for source, line, rid, good in rows:
            if good:
                at.setdefault(rid, []).append(max(s.index for s in shards if (s.source, s.first_line) <= (source, line)))
        for where in at.values():
            kinds |= {"within" if a == b else "across" for a, b in zip(where[:-1], where[1:], strict=True)}
        assert len(shards) >= 2
    assert kinds == {"within", "across"}


@pytest.mark.parametrize("collide", ["low_bits", "constant"])
def test_a_hash_collision_never_makes_a_duplicate_id(tmp_path, monkeypatch, collide):
    """Ids whose hashes collide (forced: two bits of hash, or one hash for every id) are only
    candidates: a row is dropped for its real id only, and real duplicates still are."""
    import numpy as np

    import grads_ray.stages.ingest_tasks as ingest

    real, calls = ingest.id_hash, []

    def weak(ids, seed):
        calls.append(len(ids))
        h = real(ids, seed)
        return h & np.uint64(0x3) if collide == "low_bits" else np.zeros_like(h)

    monkeypatch.setattr(ingest, "id_hash", weak)
    moved = 0
    for seed in range(6):
        shards, stage, rows = _dedup_corpus(tmp_path / str(seed), seed)
        assert len({rid for *_, rid, good in rows if good}) > 4  # more ids than hashes: some collide
        moved += _check_dedup_against_reference(shards, stage, rows)
    assert calls and moved  # the weak hash was used, and real duplicates were still moved


def test_hash_collisions_alone_move_no_duplicate(tmp_path, monkeypatch):
    """Distinct ids, every hash equal: every row is a candidate, none is a duplicate."""
    import numpy as np

    import grads_ray.stages.ingest_tasks as ingest
    from grads_ray.rundir import StageDir

    monkeypatch.setattr(ingest, "id_hash", lambda ids, seed: np.zeros(len(ids), np.uint64))
    (tmp_path / "c.jsonl").write_text("".join(json.dumps({"id": f"m.C.f@{i}", "prompt": "p", "response": "r"}) + "\n"
                                              for i in range(9)))
    shards = plan_shards([str(tmp_path / "c.jsonl")], 1 << 20, 4)
    stage = StageDir(tmp_path, "rows")
    for s in shards:
        ingest.ingest_shard(s, str(stage.path))
    before = _dedup_files(stage)
    assert ingest.drop_duplicate_ids(shards, stage) == 0
    assert _dedup_files(stage) == before


def test_a_packed_unit_round_trips():
    """The scorer's one-item unit (Arrow IPC bytes): token lists of odd and zero lengths (a rejected
    row has none), reasons and flags come back as the tokenizer gave them."""
    import numpy as np

    from grads_ray.stages.score_units import pack_unit, unpack_unit

    rng = np.random.default_rng(1)
    lengths = [5, 0, 1, 17, 3]
    tok = {"id": np.array([f"x{i}" for i in range(5)], object), "source": np.array(["a.jsonl"] * 5, object),
           "line": np.arange(5) + 10, "pos": np.arange(5) + 64,
           "input_ids": [rng.integers(0, 1000, n).astype(np.int64) for n in lengths],
           "labels": [np.where(rng.random(n) < 0.3, -100, rng.integers(0, 1000, n)).astype(np.int64) for n in lengths],
           "reason": np.array(["", "too_long", "", "", ""], object), "detail": np.array(["", "d", "", "", ""], object),
           "truncated": np.array([False, False, True, False, False])}
    back = unpack_unit(pack_unit(tok), shard=7)
    assert back["shard"].tolist() == [7] * 5
    for c in ("id", "source", "line", "pos", "reason", "detail", "truncated"):
        assert list(back[c]) == list(tok[c]), c
    for c in ("input_ids", "labels"):
        assert [x.dtype for x in back[c]] == [np.int64] * 5
        assert all(np.array_equal(a, b) for a, b in zip(back[c], tok[c], strict=True)), c


def test_stable_fraction_whole_none_and_half():
    """The warm-up's seeded share of rows: a whole epoch (1.0, the GrADS paper's preliminary epoch)
    takes every row (it overflowed a uint64 once), 0 none, 0.5 about half, the same for a seed."""
    from grads_ray.stages.train import pick_rows, stable_fraction

    ids = [f"row{i}" for i in range(4000)]
    assert stable_fraction(ids, 3, 1.0).all() and not stable_fraction(ids, 3, 0.0).any()
    assert stable_fraction(ids, 3, 1 - 2**-53).sum() >= 3999
    half = stable_fraction(ids, 3, 0.5)
    assert 1800 < half.sum() < 2200 and (half == stable_fraction(ids, 3, 0.5)).all()
    assert not (half == stable_fraction(ids, 4, 0.5)).all()
    assert (stable_fraction(ids, 3, 0.25) <= half).all()  # nested: a longer warm-up adds rows
    batch = {"id": np.array(ids, dtype=object), "n": np.arange(4000)}
    assert len(pick_rows(batch, 3, 1.0)["n"]) == 4000 and (pick_rows(batch, 3, 0.5)["n"] == np.flatnonzero(half)).all()


def test_training_rows_preloaded_or_streamed_are_the_same_rows_in_order(tmp_path, ray_local, tiny_tokenizer):
    """Small training sets are read by the driver and tokenized once (``preload_mb``); they must be
    the rows, in the order, that streaming them from Parquet gives: picked by the seeded coin, a
    rejected row dropped, an empty part (as the job writes one: no row group) and extra columns
    included. Too large (uncompressed), off (0), no file or in an object store: streamed."""
    import json

    import pyarrow as pa
    import ray

    from grads_ray.config import load_config
    from grads_ray.rundir import write_parquet
    from grads_ray.stages.train import preload_rows, stable_fraction, training_dataset

    model = tmp_path / "model"
    tiny_tokenizer.save_pretrained(model)
    files, every_id = [], []
    for i, n in enumerate((7, 0, 23, 11)):
        ids = [f"{i}-{j}" for j in range(n)]
        recs = [json.dumps({"prompt": f"What is item {i}-{j}?", "response": "It is " + "more " * (j % 5 + 1)})
                for j in range(n)]
        if n == 23:
            recs[4] = json.dumps({"prompt": "What is nothing?", "response": ""})  # rejected: empty_response
        path = tmp_path / f"part-{i}.parquet"
        write_parquet(path, pa.table({"id": pa.array(ids, pa.string()), "record": pa.array(recs, pa.string()),
                                      "line": pa.array(range(n), pa.int64())}))
        files.append(str(path))
        every_id += ids
    pick = {"seed": 1, "fraction": 0.6}
    tables = preload_rows(files, pick, 64, block_rows=4)
    picked = [i for i, keep in zip(every_id, stable_fraction(every_id, 1, 0.6), strict=True) if keep]
    assert "2-4" in picked and 10 < len(picked) < 36
    assert [i for t in tables for i in t["id"].to_pylist()] == picked
    assert all(t.column_names == ["id", "record"] and 0 < t.num_rows <= 4 for t in tables)
    assert sum(t.num_rows for t in preload_rows(files, None, 64)) == 41
    assert preload_rows(files, pick, 1e-6) is None and preload_rows(files, pick, 0) is None
    assert preload_rows([], None, 64) is None and preload_rows(["s3://bucket/part-0.parquet"], None, 64) is None
    assert preload_rows(files, {"seed": 1, "fraction": 0.0}, 64) is None  # nothing picked: streamed as before

    cfg = load_config(None, [f"model.path={model}", "data.max_length=64", "score.tokenize_batch_size=8"])
    ctx = ray.data.DataContext.get_current()
    kept = ctx.execution_options.preserve_order
    ctx.execution_options.preserve_order = True  # as the job sets it (grads_ray/resources.py)
    try:
        got = {}
        for mb in (0, 64):
            ds = training_dataset(files, pick, cfg, mb)
            assert (type(ds).__name__ == "MaterializedDataset") == (mb > 0)
            got[mb] = [tuple(x) for b in ds.iter_batches(batch_format="numpy") for x in b["input_ids"]]
    finally:
        ctx.execution_options.preserve_order = kept
    assert len(got[0]) == len(picked) - 1 and got[0] == got[64]  # the empty answer dropped by both
