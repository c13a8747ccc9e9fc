"""The stage table and the runner, without Ray: what ``--dry-run`` plans is what a run executes, for
every combination of the settings that change the job's shape; each stage is resolved once; a stage
cannot read an input it does not declare."""

from __future__ import annotations

import itertools
import json
import time

import pytest

from grads_ray.cli import STAGE_COMMANDS, main
from grads_ray.config import ConfigError, load_config
from grads_ray.runner import Runner
from grads_ray.selection.methods import METHODS
from grads_ray.stages import STAGES, Stage, closure, job_end, per_strategy
from grads_ray.summary import plan
from tests.conftest import save_tiny_model


class Recorder(Stage):
    """A stand-in with a real stage's name, folders and needs: it reads each declared input through
    the runner while it runs (the last one after the others, as evaluate reads the baseline) and
    records that it ran."""

    def __init__(self, real: Stage, calls: list[str], pause: float = 0.0):
        self.name, self.folders, self.private = real.name, real.folders, real.private
        self.while_running = real.while_running
        self.real, self.calls, self.pause = real, calls, pause

    def needs(self, cfg):
        return self.real.needs(cfg)

    def settings(self, cfg):
        return ()

    def run(self, ctx, out):
        for name in self.needs(ctx.cfg):
            ctx.need(name)
        time.sleep(self.pause)
        self.calls.append(self.name)
        return {"rows": 1}


@pytest.fixture(scope="module")
def inputs(tmp_path_factory):
    root = tmp_path_factory.mktemp("stages")
    (root / "data.jsonl").write_text(json.dumps({"prompt": "p", "response": "r"}) + "\n")
    (root / "target.jsonl").write_text(json.dumps({"prompt": "t", "response": "r"}) + "\n")
    (root / "scorer").mkdir()
    (root / "scorer" / "config.json").write_text("{}")
    return root


def _matrix(root):
    """Every method x similarity feature x score.model set or not x warm-up on/off x max_similarity
    on/off x a target set or not, as override lists (combinations the config refuses left out)."""
    for method, feature, pinned, warm, near, target in itertools.product(
            METHODS, ("hidden_mean", "grad_proj", "encoder"), (False, True), (True, False), (0.0, 0.9), (False, True)):
        overrides = [f"data.paths=[{root / 'data.jsonl'}]", f"select.method={method}",
                     f"similarity.feature={feature}", f"warmup.enabled={str(warm).lower()}",
                     f"select.max_similarity={near}", "score.response_only_loss=true"]
        overrides += [f"score.model={root / 'scorer'}"] if pinned else []
        overrides += [f"select.less.target_paths=[{root / 'target.jsonl'}]"] if target else []
        try:
            yield load_config(None, overrides)
        except ConfigError:  # fisher with max_similarity, less without a target set
            continue


def _planned(text: str) -> list[str]:
    lines = text.splitlines()
    start = lines.index("  stages") + 1
    return [line.split()[0] for line in lines[start:] if line.startswith("    ")][: len(STAGES)]


def test_the_plan_lists_exactly_the_stages_a_run_executes(inputs, tmp_path):
    configs = list(_matrix(inputs))
    assert len(configs) == 288  # 336 combinations less 24 (fisher + max_similarity) and 24 (less, no target)
    shapes = set()
    for i, cfg in enumerate(configs):
        ends = [None] + (list(STAGE_COMMANDS) if i % 16 == 0 else [])  # every stage command on a sample
        for end in ends:
            cfg.output = str(tmp_path / f"run-{i}-{end}")
            calls: list[str] = []
            Runner(cfg, stages=tuple(Recorder(s, calls) for s in STAGES)).run(end)
            planned = _planned(plan(cfg, end))
            assert calls == planned, (end, cfg.select.method, cfg.similarity.feature, cfg.score.model,
                                      cfg.warmup.enabled, cfg.select.max_similarity)
            shapes.add(tuple(planned))
            again: list[str] = []  # a rerun finds every stage done and runs none
            Runner(cfg, stages=tuple(Recorder(s, again) for s in STAGES)).run(end)
            assert again == []
    assert len(shapes) > 12  # the matrix does change the job's shape


def test_the_dry_run_cases_that_drifted(inputs, tmp_path, capsys):
    model = tmp_path / "model"
    save_tiny_model("gpt2", model)
    args = ["--model", str(model), "--data", str(inputs / "data.jsonl"), "--output", str(tmp_path / "o"), "--dry-run"]

    def stages(*extra: str, command: str = "select") -> list[str]:
        assert main([command, *args, *extra]) == 0
        return _planned(capsys.readouterr().out)

    assert stages() == ["ingest", "warmup", "score", "similarity", "select"]  # no finetune, baseline, evaluate
    assert stages(f"score.model={model}") == ["ingest", "score", "similarity", "select"]  # never warms up
    assert stages("select.method=loss", "select.max_similarity=0.9",
                  "similarity.feature=encoder") == ["ingest", "warmup", "score", "embed", "select"]
    assert main(["select", *args, "select.method=loss", "select.max_similarity=0.9"]) == 0
    text = capsys.readouterr().out
    assert "select          loss, budget 25%; max_similarity 0.9 over hidden_mean" in text
    assert "similarity      not needed" in text
    assert stages(command="evaluate")[-3:] == ["finetune", "baseline", "evaluate"]
    assert not (tmp_path / "o").exists()


def test_each_stage_runs_once_and_keeps_its_own_time(inputs, tmp_path):
    """warmup is read by score and by target (LESS): resolved once, so its manifest entry keeps the
    time it took, not the ~0 s of a second entry; and before score starts, so score's time is its own."""
    cfg = load_config(None, [f"data.paths=[{inputs / 'data.jsonl'}]", "select.method=less",
                             f"select.less.target_paths=[{inputs / 'target.jsonl'}]", f"output={tmp_path / 'o'}"])
    calls: list[str] = []
    stand_ins = tuple(Recorder(s, calls, pause=0.3 if s.name == "warmup" else 0.0) for s in STAGES)
    Runner(cfg, stages=stand_ins).run()
    assert calls == ["ingest", "warmup", "score", "target", "select", "finetune", "baseline", "evaluate"]
    manifest = json.loads((tmp_path / "o" / "manifest.json").read_text())
    assert manifest["stages"]["warmup"]["seconds"] >= 0.3 and manifest["stages"]["warmup"]["rows"] == 1
    assert manifest["stages"]["score"]["seconds"] < 0.3  # its inputs resolved before its clock starts
    assert "fingerprint" not in manifest["stages"]["warmup"] and "total_seconds" in manifest


def test_a_stage_cannot_read_an_input_it_does_not_declare(inputs, tmp_path):
    class Sneaky(Recorder):
        def run(self, ctx, out):
            ctx.need("similarity")  # not in select's needs for the random method
            return {}

    cfg = load_config(None, [f"data.paths=[{inputs / 'data.jsonl'}]", "select.method=random",
                             f"output={tmp_path / 'o'}"])
    calls: list[str] = []
    stand_ins = tuple(Sneaky(s, calls) if s.name == "select" else Recorder(s, calls) for s in STAGES)
    with pytest.raises(RuntimeError, match="stage select reads similarity, which its needs"):
        Runner(cfg, stages=stand_ins).run("select")


def test_a_stages_files_are_cleared_before_it_computes_and_required_after(inputs, tmp_path):
    """Declared files: a stale one (and an optional one) is gone when the stage runs; a finished
    stage whose file was deleted runs again (once); an undeclared entry is refused; the stage's
    report reaches the manifest, and its copy of the manifest is only a copy."""

    class Writer(Recorder):
        files, optional_files = ("note.txt",), ("plots",)

        def run(self, ctx, out):
            super().run(ctx, out)
            assert not ctx.path("note.txt").exists() and not ctx.path("plots").exists()
            ctx.manifest["stages"].clear()  # a copy: the runner's is untouched
            ctx.path("note.txt").write_text(str(len(self.calls)))
            return {"rows": 1, "calls": len(self.calls)}

        def report(self, ctx, done):
            return {"noted": ctx.path("note.txt").read_text()}

    class Sneaky(Recorder):
        def run(self, ctx, out):
            ctx.path("note.txt")  # select's, which the fine-tune does not need

    out = tmp_path / "o"
    cfg = load_config(None, [f"data.paths=[{inputs / 'data.jsonl'}]", "select.method=random", f"output={out}"])
    calls: list[str] = []
    stand_ins = tuple(Writer(s, calls) if s.name == "select" else Recorder(s, calls) for s in STAGES)
    out.mkdir()
    (out / "note.txt").write_text("stale")
    (out / "plots").mkdir()
    Runner(cfg, stages=stand_ins).run("select")
    assert calls.count("select") == 1 and not (out / "plots").exists()
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["noted"] == (out / "note.txt").read_text() == str(len(calls)) and "ingest" in manifest["stages"]
    Runner(cfg, stages=stand_ins).run("select")
    assert calls.count("select") == 1  # done, its file there: nothing runs
    first = json.loads((out / "select" / ".ledger" / "SUCCESS.json").read_text())
    (out / "note.txt").unlink()
    Runner(cfg, stages=stand_ins).run("select")
    assert calls.count("select") == 2 and (out / "note.txt").exists()
    again = json.loads((out / "select" / ".ledger" / "SUCCESS.json").read_text())
    assert again["calls"] == first["calls"] and again["computed_seconds"] == first["computed_seconds"]  # the first record
    Runner(cfg, stages=stand_ins).run("select")
    assert calls.count("select") == 2
    sneaky = tuple(Sneaky(s, calls) if s.name == "warmup" else Recorder(s, calls) for s in STAGES)
    with pytest.raises(RuntimeError, match="stage warmup uses note.txt in the run folder, which neither it nor"):
        Runner(load_config(None, [f"data.paths=[{inputs / 'data.jsonl'}]", "warmup.enabled=true",
                                  f"output={tmp_path / 'w'}"]), stages=sneaky).run("warmup")


def test_compare_shares_what_no_selection_changes():
    cfg = load_config(None, [])
    assert per_strategy(cfg) == {"select", "finetune", "evaluate"}
    from grads_ray.compare import shared_folders

    assert set(shared_folders(cfg)) == {"rows", "warmup", "stats", "features", "target", "embeddings",
                                        "similarity", "baseline"}
    assert job_end(cfg) == "evaluate" and job_end(load_config(None, ["finetune.enabled=false"])) == "select"
    assert [s.name for s in closure(cfg, "baseline")] == ["baseline"]


def test_feature_matrices_are_read_in_id_order_part_by_part_in_memory_or_mapped(tmp_path):
    """aligned_features: parts in any id order (one empty) -> (N, *shape) in sorted-id order, the same
    in memory and memory-mapped (limit 0); the factor's (r, d') from the column's metadata, and for
    features written before it was recorded (an older run, a score cache) from score.fisher_rank;
    a part set that differs from the scored ids is refused."""
    import numpy as np
    import pyarrow as pa

    from grads_ray.columns import shaped_field
    from grads_ray.data.readers import InputError
    from grads_ray.rundir import StageDir, write_parquet
    from grads_ray.selection.reading import aligned_features

    rng = np.random.default_rng(0)
    n = 23
    ids = np.array(sorted(f"id{rng.integers(10**6):07d}-{i}" for i in range(n)))
    f = rng.standard_normal((n, 2, 5)).astype(np.float32)
    perm = rng.permutation(n)

    def write(stage, field):
        for k, rows in enumerate((perm[:9], perm[9:9], perm[9:])):
            flat = pa.array([f[i].ravel() for i in rows], pa.list_(pa.float32()))
            write_parquet(stage.part(k), pa.Table.from_arrays(
                [pa.array(ids[rows], pa.string()), flat], schema=pa.schema([pa.field("id", pa.string()), field])))

    shaped, older = StageDir(tmp_path, "shaped"), StageDir(tmp_path, "older")
    write(shaped, shaped_field("fisher_factor", (2, 5)))
    write(older, pa.field("fisher_factor", pa.list_(pa.float32())))
    want = pa.array(ids, pa.string())
    spill = tmp_path / "spill"

    def split(r):
        return lambda w: (r, w // r) if w % r == 0 and w // r >= r else None
    in_memory = aligned_features(shaped, want, "fisher_factor", spill, 1 << 30, legacy=split(4))  # metadata wins
    mapped = aligned_features(shaped, want, "fisher_factor", spill, 0)
    assert isinstance(mapped, np.memmap) and not isinstance(in_memory, np.memmap)
    for got in (in_memory, mapped, aligned_features(older, want, "fisher_factor", spill, 0, legacy=split(2))):
        np.testing.assert_array_equal(got, f)
    with pytest.raises(InputError, match="fisher_factor rows of 10 numbers carry no usable shape"):
        aligned_features(older, want, "fisher_factor", spill, 1 << 30, legacy=split(3))
    with pytest.raises(RuntimeError, match="hold different ids"):
        aligned_features(shaped, pa.array(ids[1:], pa.string()), "fisher_factor", spill, 1 << 30)


def test_the_warm_up_says_what_it_does_and_how_to_skip_it(tmp_path, monkeypatch, caplog):
    """``grads-ray score --model M`` fine-tunes M first (GrADS's order): the warm-up says so as it
    starts, with the two settings that score M as it is."""
    import pyarrow as pa

    import grads_ray.stages.train as train
    from grads_ray.rundir import StageDir, write_parquet
    from grads_ray.stages.base import Done, Outputs
    from grads_ray.stages.ingest import Corpus

    rows = StageDir(tmp_path, "rows")
    write_parquet(rows.part(0), pa.table({"id": [f"r{i}" for i in range(50)]}))
    cfg = load_config(None, ["model.path=/models/M", "warmup.fraction=0.2"])
    corpus = Done("ingest", Outputs("fp", {"rows": rows}), {}, Corpus(rows, []))

    class Ctx:
        def __init__(self):
            self.cfg = cfg

        def need(self, name):
            return corpus

    monkeypatch.setattr(train, "train_on", lambda *a, **k: {})
    with caplog.at_level("INFO", logger="grads_ray"):
        info = train.Warmup().run(Ctx(), Outputs("fp", {"warmup": StageDir(tmp_path, "warmup")}))
    assert f"warmup: fine-tuning /models/M on {info['rows']} rows (20% of the corpus) before scoring it" in caplog.text
    assert "warmup.enabled=false or score.model=/models/M scores it as it is" in caplog.text


def _user_files(folder):
    return folder / "selected.jsonl", folder / "selected.parquet"


def test_the_selected_rows_are_written_once_shuffled_for_the_fine_tune(tmp_path, monkeypatch):
    """write_selected: rank order for the user (selected.jsonl/.parquet), a seeded shuffle in parts of
    part_rows for the fine-tune; the fine-tune reads those parts and nothing of the corpus."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from grads_ray.rundir import StageDir, read_parts, write_parquet
    from grads_ray.selection import writing
    from grads_ray.stages import train
    from grads_ray.stages.base import Done, Outputs

    rows = StageDir(tmp_path, "rows")
    for shard in range(3):
        write_parquet(rows.part(shard), pa.table({"id": [f"r{shard}-{i}" for i in range(20)],
                                                  "record": [f'{{"n": "{shard}-{i}"}}' for i in range(20)]}))
    ranked = pa.array([f"r{s}-{i}" for i in (7, 3, 19, 0) for s in (2, 0)])
    subset = StageDir(tmp_path / "a", "select")
    writing.write_selected(*_user_files(tmp_path / "a"), subset, rows, ranked, seed=3, part_rows=3)
    assert (tmp_path / "a" / "selected.jsonl").read_text().splitlines() == [
        json.dumps({"n": i[1:]}) for i in ranked.to_pylist()]
    assert pq.read_table(tmp_path / "a" / "selected.parquet")["id"].to_pylist() == ranked.to_pylist()
    parts = subset.parts()
    assert [pq.read_metadata(str(p)).num_rows for p in parts] == [3, 3, 2]
    shuffled = read_parts(parts)
    assert sorted(shuffled["id"].to_pylist()) == sorted(ranked.to_pylist()) != shuffled["id"].to_pylist()
    again = StageDir(tmp_path / "b", "select")
    writing.write_selected(*_user_files(tmp_path / "b"), again, rows, ranked, seed=3, part_rows=3)
    assert read_parts(again.parts()).equals(shuffled)  # the same shuffle for the seed
    for bucket_rows in (3, 4, 6):  # out of core: many spill buckets give the same files as one (4: rounded up to 6)
        spilled = StageDir(tmp_path / f"s{bucket_rows}", "select")
        writing.write_selected(*_user_files(tmp_path / f"s{bucket_rows}"), spilled, rows, ranked, seed=3, part_rows=3,
                               spill=tmp_path / "spill", bucket_rows=bucket_rows)
        assert read_parts(spilled.parts()).equals(shuffled)
        assert [pq.read_metadata(str(p)).num_rows for p in spilled.parts()] == [3, 3, 2]
        for name in ("selected.jsonl", "selected.parquet"):
            assert (tmp_path / f"s{bucket_rows}" / name).exists()
        assert (tmp_path / f"s{bucket_rows}" / "selected.jsonl").read_bytes() == (tmp_path / "a" / "selected.jsonl").read_bytes()
        assert pq.read_table(tmp_path / f"s{bucket_rows}" / "selected.parquet").equals(
            pq.read_table(tmp_path / "a" / "selected.parquet"))
    assert not any((tmp_path / "spill").iterdir())  # the buckets are removed
    other = StageDir(tmp_path / "c", "select")
    writing.write_selected(*_user_files(tmp_path / "c"), other, rows, ranked, seed=4, part_rows=3)
    assert read_parts(other.parts())["id"].to_pylist() != shuffled["id"].to_pylist()
    with pytest.raises(RuntimeError, match="1 selected ids have no ingested row"):
        writing.write_selected(*_user_files(tmp_path / "d"), StageDir(tmp_path / "d", "select"), rows,
                               pa.array(["r0-1", "nope"]), seed=3, part_rows=3)

    seen = {}
    monkeypatch.setattr(train, "train_on", lambda ctx, stage, fp, model, n, files, pick, tcfg:
                        seen.update(n=n, files=files, pick=pick) or {})
    done = Done("select", Outputs("fp", {"select": subset}), {"selected": len(ranked)})

    class Ctx:
        cfg = load_config(None, ["model.path=/models/M"])

        def need(self, name):
            assert name == "select"
            return done

    info = train.Finetune().run(Ctx(), Outputs("fp", {"finetune": StageDir(tmp_path, "finetune")}))
    assert info["rows"] == seen["n"] == 8 and seen["pick"] is None
    assert seen["files"] == [str(p) for p in parts]


def test_selection_parquet_is_written_a_row_group_at_a_time(tmp_path, monkeypatch):
    """write_selection from a ColumnSpill, in row groups of 7 rows: the same table as the columns
    written at once, the reasons as strings."""
    import numpy as np
    import pyarrow as pa
    import pyarrow.parquet as pq

    from grads_ray.selection import writing
    from grads_ray.selection.spill import ColumnSpill

    monkeypatch.setattr(writing, "SELECTION_ROW_GROUP", 7)
    rng = np.random.default_rng(0)
    n = 30
    res = {"score": rng.random(n), "rank": rng.integers(-1, 9, n), "selected": rng.random(n) < 0.3,
           "signal.x": rng.random(n).astype(np.float32),
           "reason": np.array(["", "over_budget", "duplicate"], dtype=object)[rng.integers(0, 3, n)]}
    spill = ColumnSpill(tmp_path / "spill")
    for k, v in res.items():
        spill[k] = v
    ids = pa.array([f"id{i:03d}" for i in range(n)])
    writing.write_selection(tmp_path / "selection.parquet", ids, spill)
    got = pq.read_table(tmp_path / "selection.parquet")
    assert pq.read_metadata(tmp_path / "selection.parquet").num_row_groups == 5
    assert got.equals(pa.table({"id": ids, **{k: pa.array(v) for k, v in res.items()}}))


def test_similarity_inputs_follow_the_position_column_and_refuse_other_ids(tmp_path):
    """similarity_inputs puts each part's rows at their ``position`` and yields the k-NN lists part by
    part; a part whose ids are not the scored ids at those positions is refused."""
    import numpy as np
    import pyarrow as pa
    import pyarrow.parquet as pq

    from grads_ray.columns import lists
    from grads_ray.rundir import StageDir, write_parquet
    from grads_ray.selection.reading import similarity_inputs

    rng = np.random.default_rng(1)
    n = 13
    ids = pa.array([f"id{i:02d}" for i in range(n)])
    nn = rng.integers(-1, n, (n, 3))
    sims = rng.random((n, 3)).astype(np.float32)
    perm = rng.permutation(n)

    def write(stage, id_of):
        for k, rows in enumerate((perm[:5], perm[5:5], perm[5:])):
            write_parquet(stage.part(k), pa.table({
                "id": pa.array([id_of(i) for i in rows], pa.string()), "position": pa.array(rows, pa.int64()),
                "nn_rows": lists(nn[rows]), "nn_sims": lists(sims[rows]),
                "diversity": pa.array(sims[rows, 0]), "cluster": pa.array(rows % 3), "dup_group": pa.array(rows)}))

    good = StageDir(tmp_path, "good")
    write(good, lambda i: f"id{i:02d}")
    got = similarity_inputs(good, ids)
    np.testing.assert_array_equal(got["cluster"], np.arange(n) % 3)
    np.testing.assert_array_equal(got["diversity"], sims[:, 0])
    seen = np.zeros(n, int)
    for _ in range(2):  # each pass reads the parts again
        for pos, idx, s in got["neighbours"]:
            if not len(pos):  # an empty part: (0, 0) lists
                continue
            seen[pos] += 1
            np.testing.assert_array_equal(idx, nn[pos])
            np.testing.assert_array_equal(s, sims[pos])
    assert (seen == 2).all()
    bad = StageDir(tmp_path, "bad")
    write(bad, lambda i: f"id{i:02d}" if i != 4 else "other")
    with pytest.raises(RuntimeError, match="hold different ids"):
        similarity_inputs(bad, ids)
    twice = StageDir(tmp_path, "twice")  # one row twice in a part, another missing
    write(twice, lambda i: f"id{i:02d}")
    t = pq.read_table(str(twice.part(0)))
    write_parquet(twice.part(0), pa.concat_tables([t.slice(0, 4), t.slice(0, 1)]))
    with pytest.raises(RuntimeError, match="hold different ids"):
        similarity_inputs(twice, ids)


def test_a_column_read_in_id_order_keeps_missing_integers_as_nan():
    """_place: an integer column whose later part has missing values becomes float, NaN there."""
    import numpy as np

    from grads_ray.selection.reading import _place

    out = _place(None, 4, np.array([3, 0]), np.array([7, 8]))
    out = _place(out, 4, np.array([1, 2]), np.array([np.nan, 5.0]))
    np.testing.assert_array_equal(out, [8.0, np.nan, 5.0, 7.0])


@pytest.mark.parametrize("hashing", ["real", "colliding", "ranked_collide"])
def test_rank_lookup_finds_each_id_whatever_the_hashes_do(hashing, monkeypatch):
    """rank_lookup against a plain dict: with the real hash; with a hash under which many ids that
    are not ranked collide with ranked ones (the id comparison rejects them); and with two ranked ids
    sharing a hash (the fallback to index_in)."""
    import numpy as np
    import pyarrow as pa

    from grads_ray.columns import id_hash
    from grads_ray.selection import writing

    rng = np.random.default_rng(3)
    every = [f"row-{i}" for i in range(300)]
    ranked = [every[i] for i in rng.choice(300, 40, replace=False)]
    if hashing != "real":
        code = {r: i for i, r in enumerate(ranked)}  # ranked ids: distinct values 0..39 (or 0..38 and a repeat)
        if hashing == "ranked_collide":
            code[ranked[-1]] = 0

        def weak(ids, seed):
            values = ids.to_pylist() if hasattr(ids, "to_pylist") else list(ids)
            return np.array([code.get(v, int(v.split("-")[1]) % 40) for v in values], np.uint64)

        monkeypatch.setattr(writing, "id_hash", weak)
    rank_of = writing.rank_lookup(pa.array(ranked))
    where = {r: k for k, r in enumerate(ranked)}
    for chunk in (every[:7], every[7:200], every[200:], []):
        got = rank_of(pa.array(chunk, pa.string()))
        assert got.tolist() == [where.get(i, -1) for i in chunk]
    assert id_hash is not writing.id_hash or hashing == "real"


def test_rows_that_do_not_add_up_stop_the_job_with_one_line(inputs, tmp_path, monkeypatch, capsys):
    """The score stage's last guard (every input row scored or rejected exactly once) ends the job with
    one line that gives the counts and how to score again, exit 2, not a traceback."""
    import grads_ray.runner
    from grads_ray.stages.score import Score

    class Miscounted(Recorder):  # a score stage whose rows came back one short of the input
        def report(self, ctx, done):
            return {"rejected_by_reason": {}, "accounting": {"input_rows": 7, "rejected_ingest": 1,
                                                             "rejected_score": 2, "scored": 3}}

        def check(self, ctx, done):
            Score.check(self, ctx, done)

    model = tmp_path / "model"
    save_tiny_model("gpt2", model)
    capsys.readouterr()  # (the model's writing bars)
    stand_ins = tuple((Miscounted if s.name == "score" else Recorder)(s, []) for s in STAGES)
    real = grads_ray.runner.Runner
    monkeypatch.setattr(grads_ray.runner, "Runner", lambda cfg, verbose=False: real(cfg, stages=stand_ins))
    monkeypatch.setattr("grads_ray.data.preflight.check_corpus_encodes", lambda *a, **k: None)
    code = main(["score", "--model", str(model), "--data", str(inputs / "data.jsonl"), "--output", str(tmp_path / "o"),
                 "warmup.enabled=false"])
    err = [line for line in capsys.readouterr().err.strip().splitlines() if "grads-ray" in line or "Trace" in line]
    assert code == 2 and len(err) == 1 and "Traceback" not in err[0], err
    assert err[0].startswith("grads-ray: error: score: row accounting does not add up: 7 input rows, but 3 scored "
                             "+ 1 rejected at ingest + 2 rejected at score = 6 (a row lost"), err[0]
    assert f"delete {tmp_path / 'o' / 'stats'} and {tmp_path / 'o' / 'features'}" in err[0]
