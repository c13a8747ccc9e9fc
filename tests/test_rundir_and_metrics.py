"""Run-directory ledger semantics, the LR schedule, and evaluation losses against a direct computation."""

from __future__ import annotations

import math

import pytest
import torch

from grads_ray.data.formats import IGNORE_INDEX
from grads_ray.evaluation.metrics import forgetting, mean_token_loss, text_blocks
from grads_ray.rundir import StageDir, fingerprint
from grads_ray.training.recipe import lr_lambda
from tests.conftest import save_tiny_model


def test_stage_dir_keeps_finished_shards_for_the_same_fingerprint(tmp_path):
    stage = StageDir(tmp_path, "stats")
    fp = fingerprint("a", 1)
    assert stage.prepare(fp) is False
    stage.part(0).write_text("x")
    stage.mark_done(0, {"rows": 3})
    assert stage.prepare(fp) is False and stage.is_done(0)  # interrupted run, same config: kept
    stage.finish(fp, {"rows": 3})
    assert stage.prepare(fp) is True  # complete: skipped
    assert stage.success_info()["computed_seconds"] >= 0 and stage.success_info()["rows"] == 3
    assert stage.prepare(fingerprint("a", 2)) is False  # config changed: cleared
    assert not stage.is_done(0) and not stage.part(0).exists()


def test_a_stage_folder_reads_as_one_table(tmp_path):
    """Parts with columns missing (a shard with nothing scored, an empty shard) are given the folder's
    schema, field metadata included; ledger files and rejects stay out of the readers' way."""
    import pyarrow as pa

    from grads_ray.columns import shaped_field
    from grads_ray.rundir import unify_parts, write_jsonl, write_parquet
    from tests.conftest import assert_one_table

    stage = StageDir(tmp_path, "features")
    stage.prepare("fp")
    vec = shaped_field("fisher_factor", (2, 3))
    write_parquet(stage.part(0), pa.Table.from_arrays(
        [pa.array(["a", "b"]), pa.array([1.5, 2.5]), pa.array([[0.0] * 6, [1.0] * 6], pa.list_(pa.float32()))],
        schema=pa.schema([pa.field("id", pa.string()), pa.field("head.grad_norm", pa.float64()), vec])))
    write_parquet(stage.part(1), pa.table({"id": pa.array([], pa.string())}))  # nothing scored
    write_parquet(stage.part(2), pa.table({"id": ["c"], "head.grad_norm": [0.5]}))  # no feature column
    write_jsonl(stage.rejects(1), [{"id": "x", "reason": "too_long"}])
    stage.mark_done(0, {})
    stage.finish("fp", {})
    assert unify_parts(stage) == 2 and unify_parts(stage) == 0
    assert_one_table(stage.path, rows=3)
    t = pa.concat_tables([pa.parquet.read_table(p) for p in stage.parts()])
    assert t.schema.field("fisher_factor").metadata == vec.metadata
    assert t["fisher_factor"].to_pylist()[2] is None and t["head.grad_norm"].to_pylist() == [1.5, 2.5, 0.5]
    assert [p.name for p in stage.reject_parts()] == ["part-00001.jsonl"]


def test_fingerprint_is_stable_and_sensitive():
    assert fingerprint({"a": 1, "b": [1, 2]}) == fingerprint({"b": [1, 2], "a": 1})
    assert fingerprint({"a": 1}) != fingerprint({"a": 2})


def test_lr_schedule_warms_up_then_decays_to_zero():
    f = lr_lambda(100, 0.1)
    values = [f(s) for s in range(100)]
    assert values[0] == pytest.approx(0.1) and values[9] == pytest.approx(1.0)
    assert all(a >= b for a, b in zip(values[10:], values[11:], strict=False))
    assert f(100) == pytest.approx(0.0, abs=1e-12)


def test_mean_token_loss_matches_per_example_sum(tmp_path):
    model = save_tiny_model("qwen2", tmp_path / "m").eval()
    examples = [([1, 5, 9, 13, 2], [IGNORE_INDEX, IGNORE_INDEX, 9, 13, 2]), ([7, 3, 4], [IGNORE_INDEX, 3, 4])]
    total, count = 0.0, 0
    for ids, labels in examples:  # reference: one example at a time, summed token losses
        logits = model(input_ids=torch.tensor([ids])).logits[0, :-1].double()
        target = torch.tensor(labels[1:])
        total += torch.nn.functional.cross_entropy(logits, target, ignore_index=IGNORE_INDEX, reduction="sum").item()
        count += int((target != IGNORE_INDEX).sum())
    loss, n = mean_token_loss(model, examples, batch_size=2)
    assert n == count == 5
    assert loss == pytest.approx(total / count, rel=1e-5)


def test_text_blocks_and_forgetting():
    blocks = text_blocks(list(range(10)), 4, 10)
    assert [b for b, _ in blocks] == [[0, 1, 2, 3], [4, 5, 6, 7], [8, 9]]
    assert len(text_blocks(list(range(100)), 4, 3)) == 3
    out = forgetting({"domain_loss": 4.0, "general_loss": 2.0}, {"domain_loss": 3.0, "general_loss": 2.5})
    assert out["domain_loss_rel_change"] == -0.25 and out["forgetting"] == 0.25
    assert not math.isnan(out["general_loss_rel_change"])
