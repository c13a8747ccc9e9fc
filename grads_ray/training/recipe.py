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
from typing import Any

import numpy as np
import torch

from grads_ray.data.formats import IGNORE_INDEX


def lr_lambda(total_steps: int, warmup_ratio: float):
    """Multiplier of the peak lr at a step: linear warm-up, then cosine to zero."""
    warm = max(1, int(round(total_steps * warmup_ratio)))

    def f(step: int) -> float:
        if step < warm:
            return (step + 1) / warm
        progress = (step - warm) / max(1, total_steps - warm)
        return 0.5 * (1 + math.cos(math.pi * min(progress, 1.0)))

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


def save_hf(model: torch.nn.Module, source_model_path: str, out_dir: str) -> None:
    """The (unwrapped) model and the source folder's tokenizer, in Hugging Face format."""
    from grads_ray.data.tokenize import load_tokenizer

    inner = model.module if hasattr(model, "module") else model
    inner.save_pretrained(out_dir, safe_serialization=True)
    tok = load_tokenizer(source_model_path)
    if tok is not None:
        tok.save_pretrained(out_dir)


def train_loop_per_worker(config: dict[str, Any]) -> None:
    """Ray Train entry point; ``config`` holds model_path, n_rows and the TrainConfig fields."""
    import ray.train
    import ray.train.torch
    from transformers import AutoModelForCausalLM

    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    torch.manual_seed(config["seed"] + rank)
    device = ray.train.torch.get_device()
    model = AutoModelForCausalLM.from_pretrained(config["model_path"], dtype=torch.float32,
                                                 trust_remote_code=config.get("trust_remote_code", False))
    pad_id = model.config.pad_token_id or 0
    model = ray.train.torch.prepare_model(model)
    model.train()
    steps_per_epoch = max(1, math.ceil(config["n_rows"] / (config["batch_size"] * world)))
    total = steps_per_epoch * config["epochs"]
    if config.get("max_steps"):
        total = min(total, config["max_steps"])
    opt = torch.optim.AdamW(model.parameters(), lr=config["lr"], weight_decay=config["weight_decay"])
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_lambda(total, config["warmup_ratio"]))
    use_amp = device.type == "cuda"
    shard = ray.train.get_dataset_shard("train")
    collate_fn = _pad_collate(pad_id)
    step, losses, tokens, loop_start = 0, [], 0, time.time()
    for epoch in range(config["epochs"]):
        for batch in shard.iter_torch_batches(batch_size=config["batch_size"], collate_fn=collate_fn,
                                              local_shuffle_buffer_size=4 * config["batch_size"],
                                              local_shuffle_seed=config["seed"] + epoch):
            if step >= total:
                break
            batch = {k: v.to(device) for k, v in batch.items()}
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=use_amp):
                logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
            loss, _ = token_loss(logits, batch["labels"])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            if config["grad_clip"] > 0:
                torch.nn.utils.clip_grad_norm_(model.parameters(), config["grad_clip"])
            opt.step()
            sched.step()
            losses.append(loss.item())
            tokens += int(batch["attention_mask"].sum())
            step += 1
        loop = time.time() - loop_start  # data wait included: what the stage pays, Ray start-up excluded
        metrics = {"epoch": epoch, "step": step, "train_loss": float(np.mean(losses[-steps_per_epoch:] or [math.nan])),
                   "loop_seconds": round(loop, 2), "tokens_per_s": round(tokens * world / max(loop, 1e-9), 1)}
        last = epoch == config["epochs"] - 1 or step >= total
        if last:
            with tempfile.TemporaryDirectory() as tmp:
                checkpoint = None
                if rank == 0:
                    save_hf(model, config["model_path"], tmp)
                    checkpoint = ray.train.Checkpoint.from_directory(tmp)
                ray.train.report({**metrics, "first_loss": losses[0] if losses else math.nan}, checkpoint=checkpoint)
            break
        ray.train.report(metrics)
    if os.environ.get("GRADS_RAY_DEBUG"):
        print(f"rank {rank}: {step} steps, last loss {losses[-1] if losses else None}")
