"""``score.batch_size=auto``: the scorer's batch size on a GPU from what fits in its memory.

The engine on a GPU is bound by launching work more than by arithmetic (on an H100 at Qwen2.5-0.5B's
shapes, T = 512: 360, 264 and 347 ms a batch at B = 1, 4, 16; docs/benchmarks.md, "The first GPU
run"), so 16 rows leave it mostly idle, while a 7B model at 2,048 tokens may not fit 16. So on a GPU the batch size is
measured, once per run, on the scoring model itself: the largest power of two up to ``AUTO_CAP``
whose worst batch (every row ``data.max_length`` tokens, or a learned-positions model's limit where
that is smaller, every token a response token) peaks below
``MEMORY_FRACTION`` of the memory the process can reach (half that with ``score.cuda_graphs``,
whose pool stays held). Real batches are never wider (rows are at most ``max_length``, with graphs
padded to the next multiple of 64 as the probe's are; batches are length-sorted), and the fraction
leaves room for what a probe does not see (allocator fragmentation, a mixture of experts routing real text more unevenly than
random tokens). On a CPU, ``auto`` is ``AUTO_CPU`` rows, the old default (memory is rarely the limit
there, and the engine's rate hardly depends on it: 18 to 26 examples/s from B = 1 to 16 at T = 128).

The size is measured on one GPU before the pass and recorded beside the units
(``stages/score_units.py``), so every scorer of a run, and a rerun, cuts the same batches: a row's
batch mates, hence its float32 numbers, do not depend on which scorer or which attempt scored it.

Pure search (:func:`largest_batch`) apart from the measuring (:func:`probe`, with
``gradients.memory``'s peaks), so the search is tested without a GPU.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np

from grads_ray.gradients.memory import cuda_peak, memory_budget

AUTO_CPU = 16  # score.batch_size=auto on a CPU
AUTO_CAP = 128  # the largest batch auto picks (units are 8 batches: 1,024 rows)
MEMORY_FRACTION = 0.8  # of the memory the scorer's process can reach, for the probe's peak


class BatchTooLarge(RuntimeError):
    """Not even one row of ``data.max_length`` tokens fits in the GPU's memory."""


def fixed_batch_size(setting: int | str) -> int:
    """``score.batch_size`` where no measuring is done (a CPU, a target set, a model check): the
    setting, or ``AUTO_CPU`` for ``auto``."""
    return setting if isinstance(setting, int) else AUTO_CPU


def largest_batch(peak_at: Callable[[int], int | None], budget: int, cap: int = AUTO_CAP
                  ) -> tuple[int, list[dict[str, Any]]]:
    """The largest power of two ``B <= cap`` whose measured peak is ``<= budget`` bytes.

    ``peak_at(B)`` runs the worst batch of B rows and returns its peak bytes, or None when it ran out
    of memory. B doubles from 1, and every size is run: peaks need not grow linearly (held factors
    are flushed at a fixed size), so an extrapolation could skip a size that fits. Peaks grow with
    B, so the first size over the budget ends the search.
    -> (B, the trace: one ``{"rows", "peak"}`` per size run, ``peak`` None for out of memory).
    Raises :class:`BatchTooLarge` when even B = 1 does not fit."""
    trace: list[dict[str, Any]] = []
    best, rows = 0, 1
    while rows <= cap:
        peak = peak_at(rows)
        trace.append({"rows": rows, "peak": peak})
        if peak is None or peak > budget:
            break
        best, rows = rows, rows * 2
    if not best:
        got = trace[0]["peak"]
        raise BatchTooLarge(("ran out of memory" if got is None else f"peaked at {got / 2**30:.1f} GiB")
                            + f" with one row, over the {budget / 2**30:.1f} GiB budget")
    return best, trace


def worst_rows(vocab: int, rows: int, length: int, seed: int = 0) -> tuple[list[np.ndarray], list[np.ndarray]]:
    """``rows`` rows of ``length`` random tokens, every token after the first a response token:
    the widest batch the score stage can make at ``data.max_length = length``."""
    rng = np.random.default_rng(seed)
    ids = [rng.integers(0, vocab, size=length, dtype=np.int64) for _ in range(rows)]
    labels = [np.concatenate([[-100], x[1:]]) for x in ids]
    return ids, labels


def probe(scorer: Any, max_length: int, cap: int = AUTO_CAP, fraction: float = MEMORY_FRACTION, *,
          peak: Callable[[Callable[[], Any], Any], int | None] = cuda_peak, budget: int | None = None) -> dict[str, Any]:
    """The batch size for ``scorer`` (a :class:`~grads_ray.gradients.scorer.Scorer` on a GPU) at
    ``max_length``: :func:`largest_batch` over its whole per-batch work (the engine, and the
    response-only forward when it is on), each size's peak from ``peak(step, device)``, against
    ``budget`` bytes (default: ``fraction`` of the GPU's reach). The tests pass both to run it on a
    CPU. -> ``{"batch_size", "budget", "cap", "trace", "device", "length"}``."""
    import torch

    from grads_ray.data.batching import pad_batch

    vocab = scorer.model.get_input_embeddings().num_embeddings

    def peak_at(rows: int) -> int | None:
        ids, lab, mask = (t.to(scorer.device) for t in pad_batch(*worst_rows(vocab, rows, max_length), scorer.pad_id))
        return peak(lambda: scorer.score_padded(ids, lab, mask), scorer.device)

    budget = memory_budget(scorer.device, fraction) if budget is None else budget
    best, trace = largest_batch(peak_at, budget, cap)
    device = torch.cuda.get_device_name(scorer.device) if scorer.device.type == "cuda" else "cpu"
    return {"batch_size": best, "budget": budget, "cap": cap, "trace": trace, "device": device, "length": max_length}


def probe_length(model: Any, max_length: int) -> int:
    """The rows' length to probe at: ``data.max_length``, or, for a model with learned absolute
    positions (a ``pos`` embedding table: GPT-2's ``wpe``, OPT's ``embed_positions``), its position
    limit where that is smaller: no longer row can be scored there, and a corpus whose rows are all
    shorter must not fail for the probe's sake. Rotary and ALiBi models take rows past their nominal
    limit, so they are probed at ``max_length``."""
    import torch

    learned = any(isinstance(m, torch.nn.Embedding) and (leaf == "wpe" or "pos" in leaf)
                  for name, m in model.named_modules() for leaf in [name.rsplit(".", 1)[-1]])
    if learned:
        for key in ("max_position_embeddings", "n_positions", "n_ctx"):
            limit = getattr(model.config, key, None)
            if isinstance(limit, int) and limit > 0:
                return min(max_length, limit)
    return max_length


def size_scorer(scorer: Any, max_length: int, cap: int = AUTO_CAP, **probe_kwargs: Any) -> dict[str, Any]:
    """The batch size for a built ``scorer``: :func:`probe` at :func:`probe_length` while the scorer
    runs the batched engine. A scorer that runs one example at a time (its self-check sent it to
    the loop, or the model is refused) uses about the same memory at any batch size, so measuring
    says nothing: ``AUTO_CPU``, with the reason (the scorers decide the same on the same rows; a
    refusal stops the run there). -> ``{"batch_size", "length", ...}`` as :func:`probe`, or with
    ``reason`` instead of a trace, or ``{"error"}`` when not even one row fits."""
    length = probe_length(scorer.model, max_length)
    if getattr(scorer, "graphs", None) is not None:  # score.cuda_graphs pads batches a little wider
        length = scorer.graph_length(length)

    def on_the_loop(why: str) -> dict[str, Any]:
        return {"batch_size": AUTO_CPU, "length": length, "reason": why}

    if scorer.refusal or scorer.check.engine != "batched":
        return on_the_loop(f"the scorer runs one example at a time here ({scorer.check.reason or scorer.refusal})")
    try:
        found = probe(scorer, length, cap, **probe_kwargs)
    except BatchTooLarge as exc:
        return {"error": f"score: one row of {length} tokens (data.max_length={max_length}) does not fit on the "
                         f"GPU ({exc}); lower data.max_length, or score on a GPU with more memory"}
    if scorer.check.engine != "batched":  # a probe's batch the engine could not place: the loop from there
        return on_the_loop(f"the scorer fell back to one example at a time on the probe's rows ({scorer.check.reason})")
    return found


def measure(model_path: str, *, settings: dict[str, Any], max_length: int, trust_remote_code: bool = False,
            check: list[tuple[list[int], list[int]]] | None = None, cap: int = AUTO_CAP) -> dict[str, Any]:
    """:func:`size_scorer` on a scorer of ``model_path`` built on this process's GPU, self-checked on
    ``check`` (the rows the scorers check: the same engine decision). A Ray task's body: the score
    stage runs it once before its pass; an ``{"error"}`` answer stops the run with it (a task's
    exception would carry its traceback)."""
    from grads_ray.gradients.scorer import Scorer

    scorer = Scorer(model_path, use_gpu=True, trust_remote_code=trust_remote_code, settings=settings, batch_size=1,
                    check=check)
    if scorer.device.type != "cuda":
        return {"error": "score.batch_size=auto: the task meant to measure the GPU's memory found no GPU"}
    # score.cuda_graphs: the graphs' pool stays held beside an eager pass's peak (gradients/graphs.py)
    return size_scorer(scorer, max_length, cap, fraction=graphs_fraction(settings))


def graphs_fraction(settings: dict[str, Any]) -> float:
    """The fraction of the GPU's memory a probed batch may peak at: ``MEMORY_FRACTION``, halved with
    ``score.cuda_graphs`` (a graph's pool holds about one pass's peak while an eager check runs)."""
    return MEMORY_FRACTION / 2 if settings.get("cuda_graphs") else MEMORY_FRACTION


def describe(found: dict[str, Any]) -> str:
    """One line for the log: the size chosen, and its peak and why not the next (or why not measured)."""
    gib = 2**30
    b = found["batch_size"]
    if "reason" in found:
        return f"batch size {b} (score.batch_size=auto, not measured: {found['reason']})"
    trace = found["trace"]
    fit = next(t for t in trace if t["rows"] == b)
    after = [t for t in trace if t["rows"] > b]
    why = (f"; {after[0]['rows']} " + ("ran out of memory" if after[0]["peak"] is None
                                        else f"peaked at {after[0]['peak'] / gib:.1f} GiB") if after
           else "; larger not tried")
    return (f"batch size {b} (score.batch_size=auto on {found['device']}: {b} rows x {found['length']} tokens "
            f"peaked at {fit['peak'] / gib:.1f} GiB of a {found['budget'] / gib:.1f} GiB budget{why})")
