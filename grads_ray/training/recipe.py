"""The fine-tuning recipe run by each Ray Train worker: setup, train, save (torch + Ray Train hooks).

Loss is the token-level mean over response tokens of the batch (labels -100 elsewhere); AdamW with a
linear warm-up then cosine decay; gradient clipping; bf16 autocast on GPU, float32 on CPU. The final
model is saved by rank 0 in Hugging Face format (safetensors) with the tokenizer beside it.
"""

from __future__ import annotations

import math
import os
import tempfile
import time
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from grads_ray.config import LoraConfig, TrainConfig
from grads_ray.data.formats import IGNORE_INDEX
from grads_ray.training.checkpoint import has_state, load_state, save_state, unwrap


def lr_lambda(total_steps: int, warmup_ratio: float, schedule: str = "cosine"):
    """Multiplier of the peak lr at a step: linear warm-up, then cosine or linear decay to zero, or
    constant."""
    warm = max(1, int(round(total_steps * warmup_ratio)))

    def f(step: int) -> float:
        if step < warm:
            return (step + 1) / warm
        progress = min((step - warm) / max(1, total_steps - warm), 1.0)
        if schedule == "linear":
            return 1.0 - progress
        if schedule == "constant":
            return 1.0
        return 0.5 * (1 + math.cos(math.pi * progress))

    return f


def collate(batch: dict[str, np.ndarray], pad_id: int = 0) -> dict[str, torch.Tensor]:
    """Ray Data batch of variable-length ``input_ids``/``labels`` -> right-padded tensors (B, T)."""
    from grads_ray.data.batching import pad_batch

    ids, lab, mask = pad_batch(list(batch["input_ids"]), list(batch["labels"]), pad_id)
    return {"input_ids": ids, "labels": lab, "attention_mask": mask}


def _pad_collate(pad_id: int):
    """:func:`collate` as the collate class Ray Data asks for (plain functions are deprecated)."""
    from ray.data.collate_fn import NumpyBatchCollateFn

    class PadCollate(NumpyBatchCollateFn):
        def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, torch.Tensor]:
            return collate(batch, pad_id)

    return PadCollate()


def token_loss(logits: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, int]:
    """Sum-free mean shifted cross-entropy over labelled tokens of a batch. (B, T, V), (B, T) -> (loss, n)."""
    shift_logits = logits[:, :-1].float()  # (B, T-1, V)
    shift_labels = labels[:, 1:]  # (B, T-1)
    n = int((shift_labels != IGNORE_INDEX).sum())
    loss = torch.nn.functional.cross_entropy(
        shift_logits.reshape(-1, shift_logits.shape[-1]), shift_labels.reshape(-1),
        ignore_index=IGNORE_INDEX, reduction="sum")
    return loss / max(n, 1), n


def full_state_dict(model: torch.nn.Module) -> dict[str, torch.Tensor] | None:
    """FSDP: the whole model's weights gathered on rank 0 (CPU); every rank must call it. Not FSDP:
    None (the module's own state dict is whole)."""
    from torch.distributed.fsdp import FullStateDictConfig, StateDictType
    from torch.distributed.fsdp import FullyShardedDataParallel as FSDP

    if not isinstance(model, FSDP):
        return None
    with FSDP.state_dict_type(model, StateDictType.FULL_STATE_DICT, FullStateDictConfig(offload_to_cpu=True,
                                                                                         rank0_only=True)):
        return model.state_dict()


def save_hf(model: torch.nn.Module, source_model_path: str, out_dir: str,
            state_dict: dict[str, torch.Tensor] | None = None) -> None:
    """The (unwrapped) model, LoRA adapters merged in, and the source folder's tokenizer, in Hugging
    Face format (safetensors). ``state_dict``: FSDP's gathered weights."""
    from grads_ray.data.tokenize import load_tokenizer

    inner = unwrap(model)
    if hasattr(inner, "merge_and_unload"):  # peft: a plain model with the adapters folded in
        inner = inner.merge_and_unload()
    inner.save_pretrained(out_dir, safe_serialization=True, state_dict=state_dict)
    tok = load_tokenizer(source_model_path)
    if tok is not None:
        tok.save_pretrained(out_dir)


def build_model(model_path: str, lora: LoraConfig | None = None, trust_remote_code: bool = False) -> torch.nn.Module:
    """The base model in float32, with LoRA adapters (peft) when ``lora.r`` > 0."""
    from transformers import AutoModelForCausalLM

    from grads_ray.storage import local_model

    model = AutoModelForCausalLM.from_pretrained(local_model(model_path), dtype=torch.float32,
                                                 use_safetensors=True, trust_remote_code=trust_remote_code)
    if lora is not None and lora.r > 0:
        from peft import LoraConfig as PeftLoraConfig
        from peft import get_peft_model

        targets = lora.target_modules
        model = get_peft_model(model, PeftLoraConfig(
            r=lora.r, lora_alpha=lora.alpha, lora_dropout=lora.dropout, task_type="CAUSAL_LM",
            target_modules=targets[0] if targets == ["all-linear"] else targets))
    return model


@dataclass
class LoopSettings:
    """What every worker's loop reads: the recipe (the typed :class:`TrainConfig`, no defaults of its
    own here) and where it starts. ``threads``: torch threads of a CPU worker (the CPUs it holds);
    ``deterministic``: torch's deterministic kernels (the config's top-level key);
    ``progress``: a Ray queue rank 0 puts its optimizer step on; ``fail_at_step``: tests of resumption."""

    train: TrainConfig
    model_path: str
    n_rows: int
    seed: int
    threads: int | None = None
    trust_remote_code: bool = False
    progress: Any = None
    fail_at_step: int | None = None
    deterministic: bool = True


def optimizer_steps(n_rows: int, batch_size: int, world: int, grad_accum: int, epochs: int,
                    max_steps: int | None) -> tuple[int, int]:
    """-> (optimizer steps per epoch, total steps): a worker sees ceil(n / world) rows a epoch, in
    batches of batch_size, one step per grad_accum batches (a last partial group steps too)."""
    batches = max(1, math.ceil(math.ceil(n_rows / world) / batch_size))
    per_epoch = math.ceil(batches / grad_accum)
    total = per_epoch * epochs
    return per_epoch, min(total, max_steps) if max_steps else total


def train_loop_per_worker(config: dict[str, Any]) -> None:
    """Ray Train entry point; ``config["settings"]`` is a :class:`LoopSettings`.

    Resumable: with ``checkpoint_every`` > 0 it reports the training state (grads_ray/training/
    checkpoint.py) every that many optimizer steps; a restarted worker group loads the latest and
    goes on from its step, skipping the batches that epoch had already used. The last report
    carries the final model in Hugging Face format. With ``deterministic``, in torch's deterministic
    kernels (grads_ray/determinism.py), so that one seed trains the same weights."""
    from grads_ray.determinism import deterministic

    s: LoopSettings = config["settings"]
    with deterministic(s.deterministic):
        _train_loop(s)


def _train_loop(s: LoopSettings) -> None:
    """The loop of :func:`train_loop_per_worker`."""
    import contextlib

    import ray.train
    import ray.train.torch

    t = s.train
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    torch.manual_seed(s.seed + rank)
    device = ray.train.torch.get_device()
    if device.type == "cpu" and s.threads:
        torch.set_num_threads(s.threads)  # the CPUs this worker holds (trainer.worker_cpus)
    model = build_model(s.model_path, t.lora, s.trust_remote_code)
    pad_id = model.config.pad_token_id or 0
    model = ray.train.torch.prepare_model(model, parallel_strategy=t.parallel)
    model.train()
    accum = t.grad_accum
    per_epoch, total = optimizer_steps(s.n_rows, t.batch_size, world, accum, t.epochs, t.max_steps)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=t.lr, weight_decay=t.weight_decay)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_lambda(total, t.warmup_ratio, t.schedule))
    progress = {"step": 0, "epoch": 0, "batches": 0, "first_loss": None}
    resumed_from = None
    ckpt = ray.train.get_checkpoint()
    if ckpt is not None:
        with ckpt.as_directory() as folder:
            if has_state(folder):  # else a finished run's final model: this run starts afresh
                progress = load_state(folder, model, opt, sched)
                resumed_from = progress["step"]
    use_amp = device.type == "cuda"
    shard = ray.train.get_dataset_shard("train")
    collate_fn = _pad_collate(pad_id)
    step, losses, tokens, loop_start = progress["step"], [], 0, time.time()
    waited, first_batch = 0.0, None  # seconds blocked on the data shard; until the first batch came
    first_loss = progress.get("first_loss")
    every = 0 if t.parallel == "fsdp" else t.checkpoint_every  # FSDP: final model only

    def report(metrics: dict[str, Any], state: dict[str, Any] | None = None, final: bool = False) -> None:
        with tempfile.TemporaryDirectory() as tmp:
            checkpoint = None
            whole = full_state_dict(model) if final else None  # FSDP: a collective, on every rank
            if rank == 0 and (state is not None or final):
                if final:
                    save_hf(model, s.model_path, tmp, whole)
                else:
                    save_state(tmp, model, opt, sched, state)
                checkpoint = ray.train.Checkpoint.from_directory(tmp)
            ray.train.report(metrics, checkpoint=checkpoint)

    micro, pending, told = 0, [], 0.0
    for epoch in range(progress["epoch"], t.epochs):
        skip = progress["batches"] if epoch == progress["epoch"] else 0
        batches = shard.iter_torch_batches(batch_size=t.batch_size, collate_fn=collate_fn,
                                           local_shuffle_buffer_size=4 * t.batch_size,
                                           local_shuffle_seed=s.seed + epoch)
        seen, batch_iter = 0, iter(batches)
        while True:
            asked = time.time()
            batch = next(batch_iter, None)
            waited += time.time() - asked
            first_batch = time.time() - loop_start if first_batch is None else first_batch
            if batch is None:
                break
            seen += 1
            if seen <= skip:  # used before the restart
                continue
            if step >= total:
                break
            batch = {k: v.to(device) for k, v in batch.items()}
            micro += 1
            sync = micro % accum == 0
            no_sync = model.no_sync if (not sync and hasattr(model, "no_sync")) else contextlib.nullcontext
            with no_sync():  # DDP: reduce gradients on the group's last micro-batch only
                with torch.autocast(device.type, dtype=torch.bfloat16, enabled=use_amp):
                    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
                    loss, _ = token_loss(logits, batch["labels"])
                (loss / accum).backward()
            pending.append(loss.item())
            tokens += int(batch["attention_mask"].sum())
            if sync:
                step = _optimizer_step(model, opt, sched, t.grad_clip, step)
                losses.append(float(np.mean(pending)))
                first_loss = losses[0] if first_loss is None else first_loss
                pending, micro = [], 0
                if rank == 0 and s.progress is not None and (time.time() - told > 2 or step >= total):
                    told = time.time()
                    with contextlib.suppress(Exception):  # progress is a courtesy: never fail a run over it
                        s.progress.put_nowait(step)
                if s.fail_at_step == step and resumed_from is None:  # tests: resumption
                    raise RuntimeError(f"injected failure at step {step}")
                if every and step % every == 0 and step < total:
                    report({"epoch": epoch, "step": step, "train_loss": losses[-1]},
                           {"step": step, "epoch": epoch, "batches": seen, "first_loss": first_loss})
        if pending and step < total:  # the epoch's last, partial group of micro-batches
            step = _optimizer_step(model, opt, sched, t.grad_clip, step)
            losses.append(float(np.mean(pending)))
            first_loss = losses[0] if first_loss is None else first_loss
            pending, micro = [], 0
        loop = time.time() - loop_start  # data wait included: what the stage pays, Ray start-up excluded
        metrics = {"epoch": epoch, "step": step, "train_loss": float(np.mean(losses[-per_epoch:] or [math.nan])),
                   "loop_seconds": round(loop, 2), "tokens_per_s": round(tokens * world / max(loop, 1e-9), 1),
                   "data_wait_seconds": round(waited, 2), "first_batch_seconds": round(first_batch or 0.0, 2),
                   "first_loss": first_loss if first_loss is not None else math.nan, "total_steps": total,
                   "resumed_from_step": resumed_from, "torch_threads": torch.get_num_threads(),
                   "device": device.type}
        if epoch == t.epochs - 1 or step >= total:
            report(metrics, final=True)
            break
        report(metrics, {"step": step, "epoch": epoch + 1, "batches": 0, "first_loss": first_loss} if every else None)
    if os.environ.get("GRADS_RAY_DEBUG"):
        print(f"rank {rank}: {step} steps, last loss {losses[-1] if losses else None}")


def _optimizer_step(model, opt, sched, grad_clip: float, step: int) -> int:
    """Clip, step, schedule, zero. -> the new step count."""
    if grad_clip > 0:
        torch.nn.utils.clip_grad_norm_([p for p in model.parameters() if p.requires_grad], grad_clip)
    opt.step()
    sched.step()
    opt.zero_grad(set_to_none=True)
    return step + 1
