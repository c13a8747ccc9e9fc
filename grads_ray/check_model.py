"""``grads-ray check-model``: which score engine a model folder gets, without scoring a corpus.

Loads the model as a scorer does (``score.dtype``, GPU when ``score.use_gpu`` allows), runs the
batched engine's self-check (gradients/selfcheck.py) on a few rows of ``--data`` when given (the first
rows that tokenize), else on random tokens, and prints the verdict: the batched engine (exact, with
the errors measured), the per-example loop and why, or a refusal under ``score.engine=batched``
(exit 2, as the job would).
"""

from __future__ import annotations

import json
from collections import Counter
from typing import Any

HEAD_ROWS = 64  # rows of --data read to pick the check's rows from


def head_examples(paths: list[str], model_path: str, max_length: int, trust_remote_code: bool = False,
                  rows: int = HEAD_ROWS) -> list[tuple[list[int], list[int]]]:
    """The first ``rows`` rows of the corpus that tokenize, as the job tokenizes them."""
    from grads_ray.data.formats import RowError, normalize
    from grads_ray.data.readers import plan_shards, read_shard
    from grads_ray.data.tokenize import encode, load_tokenizer

    tok = load_tokenizer(model_path, trust_remote_code)
    out: list[tuple[list[int], list[int]]] = []
    for shard in plan_shards(paths, 1 << 40, 1 << 40):
        for raw in read_shard(shard):
            try:
                if raw.error:
                    raise raw.error
                ids, labels = encode(normalize(raw.record), tok, max_length, "truncate")
            except RowError:
                continue
            out.append((list(ids), list(labels)))
            if len(out) >= rows:
                return out
    return out


def check_model(cfg, data_paths: list[str] | None = None) -> tuple[dict[str, Any], int]:
    """-> (the report, the exit code: 0, or 2 when ``score.engine=batched`` refuses the model)."""
    import torch

    from grads_ray.gradients.batch_size import fixed_batch_size
    from grads_ray.gradients.scorer import Scorer, engine_settings
    from grads_ray.gradients.selfcheck import pick_rows

    examples = pick_rows(head_examples(data_paths, cfg.model.path, cfg.data.max_length,
                                       cfg.model.trust_remote_code), cfg.score.check_rows) if data_paths else None
    use_gpu = cfg.score.use_gpu == "true" or (cfg.score.use_gpu == "auto" and torch.cuda.is_available())
    scorer = Scorer(cfg.model.path, use_gpu=use_gpu, trust_remote_code=cfg.model.trust_remote_code,
                    settings=engine_settings(cfg.score, cfg.seed, cfg.deterministic), batch_size=fixed_batch_size(cfg.score.batch_size),
                    check=examples)
    model = scorer.model
    rules: Counter[str] = Counter()
    try:
        from grads_ray.gradients.rules import UnsupportedModel, plan

        params = {n: p for n, p in model.named_parameters() if p.requires_grad}
        for use in plan(model, params):
            for e in use.entries:
                rules[e.rule] += 1
    except UnsupportedModel:
        pass
    report = {"model": cfg.model.path, "model_type": getattr(model.config, "model_type", "?"),
              "architecture": type(model).__name__, "parameters": sum(p.numel() for p in model.parameters()),
              "engine_setting": cfg.score.engine, "rules": dict(sorted(rules.items())),
              "check_rows": "corpus" if examples else "random tokens", **scorer.check.to_dict()}
    if scorer.refusal:
        report["engine"], report["refused"] = "refused", scorer.refusal
        return report, 2
    return report, 0


def render(report: dict[str, Any]) -> str:
    """The report as the lines ``grads-ray check-model`` prints."""
    lines = [f"model: {report['model']} ({report['model_type']}, {report['architecture']}, "
             f"{report['parameters']:,} parameters, {report['dtype']} on {report['device']})"]
    if report["rules"]:
        lines.append("rules: " + ", ".join(f"{k} {v}" for k, v in report["rules"].items())
                     + " (parameters each rule covers)")
    if report.get("passed") is not None:
        lines.append(f"self-check: {report['rows']} rows of {report['check_rows']} ({', '.join(map(str, report['tokens']))} "
                     f"tokens), {report['seconds']:.1f} s; largest relative error: "
                     + ", ".join(f"{k} {v:.1e}" for k, v in report.get("errors", {}).items())
                     + f" (tolerance {_tol(report['tolerance'])} in {report['dtype']})")
        if report.get("float32"):
            f32 = report["float32"]
            lines.append(f"  and in float32: {f32['max_rel_error']:.1e} (tolerance {_tol(f32['tolerance'])})")
    if report["engine"] == "batched":
        lines.append("verdict: batched (exact on this model)")
    elif report["engine"] == "refused":
        lines.append(f"verdict: refused: {report['refused']}")
    else:
        lines.append(f"verdict: loop (one example at a time): {report['reason']}")
    for failure in report.get("failures", [])[:10]:
        lines.append(f"  {failure}")
    return "\n".join(lines)


def _tol(tol: dict[str, float]) -> str:
    return f"{tol['written']:g} on the numbers written, {tol['parameters']:g} on each parameter"


def to_json(report: dict[str, Any]) -> str:
    return json.dumps(report, indent=2, default=float)
