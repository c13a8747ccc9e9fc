"""The fine-tuning recipe: schedules, step counts, the checkpoint round trip (no pickles), LoRA, and on
a local Ray: two CPU workers learn, and a run that dies resumes from its checkpoint at the right step
and ends with the same weights as one that did not."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from grads_ray.config import LoraConfig, TrainConfig
from grads_ray.training.checkpoint import load_state, save_state
from grads_ray.training.recipe import build_model, lr_lambda, optimizer_steps, token_loss
from tests.conftest import save_tiny_model


def test_schedules_by_hand():
    lin, const, cos = (lr_lambda(10, 0.2, s) for s in ("linear", "constant", "cosine"))
    assert [round(lin(s), 4) for s in (0, 1, 2, 6, 10)] == [0.5, 1.0, 1.0, 0.5, 0.0]  # 2 warm-up steps
    assert const(1) == const(9) == 1.0 and const(0) == 0.5
    assert cos(6) == pytest.approx(0.5) and cos(10) == pytest.approx(0.0, abs=1e-12)


def test_optimizer_steps():
    assert optimizer_steps(100, 8, 1, 1, 2, None) == (13, 26)  # 13 batches an epoch
    assert optimizer_steps(100, 8, 2, 1, 1, None) == (7, 7)  # 50 rows a worker
    assert optimizer_steps(100, 8, 1, 4, 3, None) == (4, 12)  # 13 batches: 3 full groups and a partial one
    assert optimizer_steps(100, 8, 1, 1, 5, 20) == (13, 20)


def _batches(n: int, seed: int, vocab: int = 64):
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        ids = torch.randint(3, vocab, (4, 9), generator=g)
        labels = ids.clone()
        labels[:, :3] = -100
        out.append((ids, labels))
    return out


def _step(model, opt, sched, ids, labels):
    loss, _ = token_loss(model(input_ids=ids).logits, labels)
    loss.backward()
    opt.step()
    sched.step()
    opt.zero_grad(set_to_none=True)


@pytest.mark.parametrize("lora_r", [0, 4])
def test_checkpoint_round_trip_continues_identically(tmp_path, lora_r):
    """Train 3 steps, save, load into fresh objects, train 2 more on both: bit-identical weights and
    optimizer moments; the files are safetensors and JSON."""
    save_tiny_model("llama", tmp_path / "base", vocab=64)
    lora = LoraConfig(r=lora_r, alpha=8)

    def fresh():
        torch.manual_seed(0)
        m = build_model(str(tmp_path / "base"), lora)
        o = torch.optim.AdamW([p for p in m.parameters() if p.requires_grad], lr=1e-2, weight_decay=0.01)
        return m, o, torch.optim.lr_scheduler.LambdaLR(o, lr_lambda(5, 0.2))

    data = _batches(5, 1)
    a, opt_a, sched_a = fresh()
    for ids, lab in data[:3]:
        _step(a, opt_a, sched_a, ids, lab)
    save_state(tmp_path / "ck", a, opt_a, sched_a, {"step": 3, "epoch": 0, "batches": 3})
    assert sorted(p.name for p in (tmp_path / "ck").iterdir()) == ["optimizer.safetensors", "state.json",
                                                                     "trainable.safetensors"]
    b, opt_b, sched_b = fresh()
    assert load_state(tmp_path / "ck", b, opt_b, sched_b) == {"step": 3, "epoch": 0, "batches": 3}
    assert sched_b.last_epoch == 3 and sched_b.get_last_lr() == sched_a.get_last_lr()
    for ids, lab in data[3:]:
        _step(a, opt_a, sched_a, ids, lab)
        _step(b, opt_b, sched_b, ids, lab)
    for (na, pa), (nb, pb) in zip(a.named_parameters(), b.named_parameters(), strict=True):
        assert na == nb and torch.equal(pa, pb), na
    n_trainable = sum(p.requires_grad for p in a.parameters())
    assert (n_trainable < len(list(a.parameters()))) == (lora_r > 0)  # LoRA trains the adapters only


def test_load_refuses_a_checkpoint_missing_trainable_weights(tmp_path):
    save_tiny_model("llama", tmp_path / "base", vocab=64)
    full = build_model(str(tmp_path / "base"))
    lora = build_model(str(tmp_path / "base"), LoraConfig(r=2, alpha=4))
    for m in (full, lora):
        m.opt = torch.optim.AdamW([p for p in m.parameters() if p.requires_grad])
        m.sched = torch.optim.lr_scheduler.LambdaLR(m.opt, lambda s: 1.0)
    save_state(tmp_path / "ck", lora, lora.opt, lora.sched, {"step": 0})
    with pytest.raises(ValueError, match="lacks trainable parameters"):
        load_state(tmp_path / "ck", full, full.opt, full.sched)


def test_fsdp_without_gpus_is_a_clear_error(tmp_path):
    from grads_ray.config import ConfigError, load_config
    from grads_ray.training.trainer import train

    with pytest.raises(ValueError, match="fsdp needs GPUs"):
        train(None, 1, "m", tmp_path / "o", TrainConfig(parallel="fsdp"), name="t", storage_path=tmp_path, seed=0,
              use_gpu=False)
    with pytest.raises(ConfigError, match="fsdp"):
        load_config(None, ["finetune.parallel=fsdp", "finetune.lora.r=8"])


def test_worker_cpus_auto_and_refused():
    from grads_ray.config import ConfigError, load_config, recipe
    from grads_ray.training.trainer import worker_cpus

    assert worker_cpus(0, 1, [2], "finetune") == 1  # one CPU left for Ray Data
    assert worker_cpus(0, 1, [16], "finetune") == 15
    assert worker_cpus(0, 2, [16], "finetune") == 7
    assert worker_cpus(0, 2, [16, 8], "finetune") == 7  # one worker a node; the smallest node bounds it
    assert worker_cpus(0, 4, [2], "finetune") == 1
    assert worker_cpus(3, 2, [8], "finetune") == 3
    with pytest.raises(ConfigError, match=r"finetune.cpus_per_worker=5: 2 worker\(s\) a node need 10 CPUs"):
        worker_cpus(5, 2, [8], "finetune")
    with pytest.raises(ConfigError, match="leave none for Ray Data"):
        worker_cpus(2, 1, [2], "warmup")
    with pytest.raises(ConfigError, match="cpus_per_worker"):
        load_config(None, ["warmup.cpus_per_worker=-1"])
    # a resource, not the recipe: the stage fingerprint ignores it
    cfg = load_config(None, ["finetune.cpus_per_worker=3"])
    assert recipe(cfg.finetune) == recipe(load_config(None, []).finetune)
    assert recipe(cfg.finetune) != recipe(load_config(None, ["finetune.lr=0.5"]).finetune)


# ------------------------------------------------------------------------------------- on Ray
def _dataset(n: int, vocab: int):
    """n short examples of a few repeated patterns: a model can learn them in a few steps."""
    import ray

    rng = np.random.default_rng(0)
    patterns = [rng.integers(3, vocab, 12).tolist() for _ in range(4)]
    rows = []
    for i in range(n):
        ids = patterns[i % 4]
        rows.append({"input_ids": np.array(ids), "labels": np.array([-100] * 4 + ids[4:])})
    return ray.data.from_items(rows)


def _train(tmp_path, ray_local, name: str, cfg: TrainConfig, n: int = 48, **options):
    from grads_ray.training.trainer import train

    save_tiny_model("llama", tmp_path / "base", vocab=64)
    out = tmp_path / f"{name}-model"
    metrics = train(_dataset(n, 64), n, str(tmp_path / "base"), out, cfg, name=name, storage_path=tmp_path / "ray_train",
                    seed=0, use_gpu=False, **options)
    return metrics, out


def _weights(folder):
    from safetensors.torch import load_file

    return load_file(str(folder / "model.safetensors"))


@pytest.mark.ray
def test_two_cpu_workers_learn(tmp_path, ray_local):
    cfg = TrainConfig(epochs=6, batch_size=4, lr=2e-2, num_workers=2, grad_accum=2, schedule="linear")
    metrics, out = _train(tmp_path, ray_local, "ddp2", cfg)
    assert metrics["total_steps"] == 18 and metrics["step"] == 18  # 24 rows a worker: 6 batches, 3 steps an epoch
    assert metrics["torch_threads"] == 1  # auto: 2 CPUs, 2 workers on one node
    assert metrics["device"] == "cpu"
    # where the loop's time went: waiting on Ray Data (most of it for the first batch) is part of it
    assert 0 < metrics["first_batch_seconds"] <= metrics["data_wait_seconds"] <= metrics["loop_seconds"]
    assert metrics["train_loss"] < 0.7 * metrics["first_loss"]
    assert json.loads((out / "config.json").read_text())["model_type"] == "llama"


@pytest.mark.ray
def test_a_failed_run_resumes_at_its_checkpoint(tmp_path, ray_local):
    """Dies at step 5 (checkpoint at 4): the restarted worker resumes from step 4, skips the batches
    it had used, and ends with the weights of a run that never failed."""
    cfg = TrainConfig(epochs=2, batch_size=4, lr=5e-3, checkpoint_every=2)
    clean, clean_out = _train(tmp_path, ray_local, "clean", cfg)
    assert clean["torch_threads"] == 1  # auto on this 2-CPU cluster: 1 CPU, one left for Ray Data
    failed, failed_out = _train(tmp_path, ray_local, "failed", cfg, fail_at_step=5)
    assert clean["resumed_from_step"] is None and failed["resumed_from_step"] == 4
    assert failed["step"] == clean["step"] == 24 and failed["first_loss"] == clean["first_loss"]
    a, b = _weights(clean_out), _weights(failed_out)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    # the same run name again (a stage rerun after its output was removed): the finished run's final
    # checkpoint is a model, not a state: it starts afresh and ends the same
    again, again_out = _train(tmp_path, ray_local, "clean", cfg)
    c = _weights(again_out)
    assert again["resumed_from_step"] is None and all(torch.equal(a[k], c[k]) for k in a)


@pytest.mark.ray
def test_lora_fine_tune_saves_a_merged_model(tmp_path, ray_local):
    from transformers import AutoModelForCausalLM

    cfg = TrainConfig(epochs=3, batch_size=4, lr=2e-2, lora=LoraConfig(r=4, alpha=8))
    metrics, out = _train(tmp_path, ray_local, "lora", cfg, threads=2)
    # the loop sets torch's threads to what the trainer passes (2 by hand: a 2-CPU reservation
    # would leave Ray Data none)
    assert metrics["torch_threads"] == 2
    assert metrics["train_loss"] < metrics["first_loss"]
    assert not (out / "adapter_config.json").exists()  # merged: a plain checkpoint
    tuned = _weights(out)
    base = _weights(tmp_path / "base")
    assert tuned.keys() == base.keys()
    changed = [k for k in base if not torch.equal(base[k], tuned[k])]
    assert changed and all("proj" in k for k in changed)  # only the adapted linear layers moved
    AutoModelForCausalLM.from_pretrained(out)
