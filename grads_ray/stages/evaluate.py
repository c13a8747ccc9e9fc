"""baseline and evaluate: how much the fine-tune taught and how much it cost.

Both evaluate one checkpoint in a Ray task (a GPU when present): the held-out domain rows' loss, the
general text's loss (forgetting) and, for the first ``eval.generate`` held-out prompts, greedy
continuations scored with BLEU, chrF and ROUGE-L (grads_ray/evaluation/). baseline is the base
model's side: it depends on the base model, the eval settings and the held-out files only, so
``grads-ray compare`` computes it once and links it into every run. evaluate starts the fine-tuned
model's task, takes the baseline (computed beside it when missing) and writes ``eval.json``: before,
after and their relative changes.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from grads_ray.rundir import read_json, write_json
from grads_ray.stages.base import Outputs, Stage


@dataclass
class Evaluation:
    """The held-out sets, tokenized once, and the task that evaluates a checkpoint on them."""

    task: Any  # the Ray remote function grads_ray.evaluation.metrics.evaluate_model
    domain: list[tuple[list[int], list[int]]]
    general: str | None
    rejected: int  # held-out rows that could not be encoded
    options: dict[str, Any]

    def start(self, model_path: str):
        """-> the Ray object ref of the metrics of ``model_path``."""
        return self.task.remote(model_path, self.domain, self.general, **self.options)

    def counts(self) -> dict[str, int]:
        return {"heldout_examples": len(self.domain), "heldout_rejected": self.rejected}


def evaluation(ctx) -> Evaluation:
    """The held-out files read and tokenized (with the base model's tokenizer) in the driver."""
    import ray

    from grads_ray.data.tokenize import encode_files
    from grads_ray.evaluation.metrics import evaluate_model

    cfg, e, res = ctx.cfg, ctx.cfg.eval, ctx.ray()
    held = encode_files(e.domain_paths, cfg.model.path, cfg.data.max_length, "truncate", cfg.model.trust_remote_code)
    general = "\n\n".join(Path(p).read_text(errors="replace") for p in e.general_paths) or None
    use_gpu = res.gpu(cfg.finetune.use_gpu)
    task = ray.remote(num_cpus=1, num_gpus=1 if use_gpu else 0)(evaluate_model)
    return Evaluation(task, held.examples, general, held.rejected,
                      {"block_size": e.block_size, "max_blocks": e.max_general_blocks, "batch_size": e.batch_size,
                       "use_gpu": use_gpu, "generate": e.generate, "max_new_tokens": e.max_new_tokens,
                       "wordnet": wordnet_for(e.wordnet)})


def wordnet_for(setting: str) -> str:
    """The WordNet folder the driver finds for ``eval.wordnet`` (a worker elsewhere gets the folder
    if found here, else the setting to look for itself), and so what the evaluation's fingerprint
    names: installing WordNet later recomputes the evaluations that had none."""
    from grads_ray.evaluation.meteor import find_wordnet

    folder, _ = find_wordnet(setting)
    return str(folder) if folder is not None else setting


def eval_settings(cfg) -> dict[str, Any]:
    """What an evaluation's result depends on among the eval settings: all of them, with the
    WordNet setting resolved (:func:`wordnet_for`)."""
    if cfg.eval.generate <= 0:
        return asdict(cfg.eval)
    return {**asdict(cfg.eval), "wordnet": wordnet_for(cfg.eval.wordnet)}


class Baseline(Stage):
    name, folders, private = "baseline", ("baseline",), ("before",)
    about = "the base model evaluated, every evaluation's before: baseline/"

    def settings(self, cfg) -> tuple:
        return cfg.model.path, eval_settings(cfg), cfg.data.max_length

    def run(self, ctx, out: Outputs) -> dict[str, Any]:
        import ray

        ev = evaluation(ctx)
        return {"before": ray.get(ev.start(ctx.cfg.model.path)), **ev.counts()}

    def value(self, ctx, out: Outputs, info: dict[str, Any]) -> dict[str, Any]:
        return info["before"]


class Evaluate(Stage):
    name, folders = "evaluate", ("evaluate",)
    about = "the fine-tuned model evaluated against the baseline: eval.json"
    files = ("eval.json",)
    while_running = ("baseline",)  # computed while the fine-tuned model's evaluation runs, when missing

    def needs(self, cfg) -> list[str]:
        return ["finetune", "baseline"]

    def settings(self, cfg) -> tuple:
        return (eval_settings(cfg),)

    def run(self, ctx, out: Outputs) -> dict[str, Any]:
        import ray

        from grads_ray.evaluation.metrics import forgetting

        ev = evaluation(ctx)
        after_ref = ev.start(ctx.need("finetune").value)
        before = ctx.need("baseline").value  # computed while the fine-tuned model's task runs, when missing
        after = ray.get(after_ref)
        result = {"before": before, "after": after, **forgetting(before, after), **ev.counts()}
        write_json(ctx.path("eval.json"), result)
        return result

    def value(self, ctx, out: Outputs, info: dict[str, Any]) -> dict[str, Any]:
        return read_json(ctx.path("eval.json"))
