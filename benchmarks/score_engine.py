"""Cost of exact per-example gradient statistics relative to ordinary training, same batch, same run.

Baseline: one batched forward+backward of the mean response-token loss (what a training step costs,
without the optimizer). Measured: the score engine (`gradients.stats.batch_stats`) on the same
padded batch. Prints the per-example times and their ratio; the last line is one JSON object.

    python benchmarks/score_engine.py --quick      # a few CPU minutes at most
"""

from __future__ import annotations

import argparse
import json
import platform
import time

import numpy as np
import torch

from grads_ray.data.formats import IGNORE_INDEX
from grads_ray.gradients.stats import batch_stats
from grads_ray.training.recipe import token_loss


def make_batch(batch: int, length: int, vocab: int, seed: int):
    rng = np.random.default_rng(seed)
    ids = torch.zeros((batch, length), dtype=torch.long)
    labels = torch.full((batch, length), IGNORE_INDEX, dtype=torch.long)
    mask = torch.zeros((batch, length), dtype=torch.long)
    for i in range(batch):
        n = int(rng.integers(length // 2, length + 1))  # odd lengths, right padding
        prompt = int(rng.integers(1, n // 2))
        row = torch.as_tensor(rng.integers(0, vocab, n))
        ids[i, :n], mask[i, :n] = row, 1
        labels[i, prompt:n] = row[prompt:]
    return ids, labels, mask


def timed(fn, repeats: int) -> float:
    fn()  # warm-up
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t0)
    return best


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--length", type=int, default=None)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    from transformers import LlamaConfig, LlamaForCausalLM

    hidden, layers, length = (64, 2, 128) if args.quick else (256, 4, 256)
    length = args.length or length
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=4096, hidden_size=hidden, intermediate_size=4 * hidden, num_hidden_layers=layers,
                      num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=1024)
    model = LlamaForCausalLM(cfg).eval()
    ids, labels, mask = make_batch(args.batch, length, cfg.vocab_size, 0)

    def plain_step():
        model.zero_grad(set_to_none=True)
        loss, _ = token_loss(model(input_ids=ids, attention_mask=mask).logits, labels)
        loss.backward()

    def engine():
        batch_stats(model, ids, labels, mask)

    t_plain = timed(plain_step, args.repeats) / args.batch
    t_engine = timed(engine, args.repeats) / args.batch
    params = sum(p.numel() for p in model.parameters())
    print(f"model {params / 1e6:.2f}M params, batch {args.batch}, length <= {length}, torch threads {torch.get_num_threads()}")
    print(f"plain batched forward+backward: {t_plain * 1e3:8.2f} ms/example")
    print(f"exact per-example statistics:   {t_engine * 1e3:8.2f} ms/example  ({t_engine / t_plain:.1f}x)")
    print(json.dumps({"benchmark": "score_engine", "quick": args.quick, "params": params, "batch": args.batch,
                      "length": length, "plain_ms_per_example": round(t_plain * 1e3, 3),
                      "engine_ms_per_example": round(t_engine * 1e3, 3),
                      "engine_vs_plain_ratio": round(t_engine / t_plain, 2), "machine": platform.machine(),
                      "threads": torch.get_num_threads()}))


if __name__ == "__main__":
    main()
