"""What a run will do (``--dry-run``'s plan) and what it did (the summary printed at the end).

The plan lists the stages the runner would take for the same config and command — the same stage
table and closure (grads_ray/stages/__init__.py) — each with whether its output is there already.
Neither starts Ray or writes a file.
"""

from __future__ import annotations

import os
from collections import Counter
from pathlib import Path

from grads_ray import storage
from grads_ray.config import Config
from grads_ray.data.readers import plan_shards
from grads_ray.rundir import StageDir
from grads_ray.selection.inputs import method_needs
from grads_ray.stages import Stage, closure, job_end


def _state(out: storage.Location, stage: Stage) -> str:
    folder = StageDir(out, stage.folders[0])
    missing = stage.missing_files(out)
    if folder.success_path.exists() and missing:
        return f"finished before, {', '.join(missing)} missing: to finish again over its kept shards"
    if folder.success_path.exists():
        return "finished before (skipped if its inputs and config are unchanged)"
    done = len(list((folder.ledger / "done").glob("*.json"))) if (folder.ledger / "done").is_dir() else 0
    return f"to run ({done} shards finished before)" if done else "to run"


def plan(cfg: Config, end: str | None = None) -> str:
    """What ``run`` (or the stage command ``end``) would do: inputs and shards, the stages in order
    and whether each has a finished output, the workers and resources, the method and budget."""
    import torch

    from grads_ray.gradients.batch_size import AUTO_CPU

    d, sc = cfg.data, cfg.select
    shards = plan_shards(d.paths, d.shard_bytes, d.shard_rows, d.limit)
    by_source = Counter(s.source for s in shards)
    out = storage.location(cfg.output)
    stages = closure(cfg, end or job_end(cfg))
    names = {s.name for s in stages}
    lines = [f"grads-ray plan (dry run): nothing is started or written under {out}",
             f"  model           {cfg.model.path}",
             f"  inputs          {len(by_source)} files, {len(shards)} shards"
             + (f" (first {d.limit} rows)" if d.limit else "")]
    lines += [f"    {src}: {n} shard{'s' if n > 1 else ''}" for src, n in list(by_source.items())[:10]]
    if len(by_source) > 10:
        lines.append(f"    ... and {len(by_source) - 10} more files")
    lines.append("  stages")
    lines += [f"    {s.name:<11} {_state(out, s)}" for s in stages]
    where = cfg.ray.address or os.environ.get("RAY_ADDRESS") or "a local Ray cluster started by the job"
    lines += [f"  ray             {where}; this machine: {os.cpu_count()} CPUs, {torch.cuda.device_count()} GPUs",
              f"  seed            {cfg.seed}; "
              + ("deterministic kernels" if cfg.deterministic
                 else "deterministic=false: a GPU's numbers differ at rounding between runs")]
    if "score" in names:
        lines.append(f"  score           {cfg.score.num_actors} actor(s), use_gpu={cfg.score.use_gpu}, "
                     f"batch {cfg.score.batch_size}"
                     + (f" ({AUTO_CPU} on a CPU, measured on a GPU)" if cfg.score.batch_size == "auto" else "")
                     + (f", model {cfg.score.model}" if cfg.score.model else ""))
    train = [f"warm-up {cfg.warmup.fraction:.0%} x {cfg.warmup.epochs} epoch(s)" if "warmup" in names else "",
             f"fine-tune {cfg.finetune.epochs} epoch(s); {cfg.finetune.num_workers} worker(s), "
             f"{cfg.finetune.parallel}" + (f", LoRA r={cfg.finetune.lora.r}" if cfg.finetune.lora.r else "")
             if "finetune" in names else ""]
    if any(train):
        lines.append(f"  train           {', '.join(t for t in train if t)}")
    s = cfg.similarity
    lines.append(f"  similarity      {s.feature}, k={s.k}, index {s.index}, duplicates at cosine >= {s.threshold()}"
                 if "similarity" in names else "  similarity      not needed")
    if "select" in names:
        need = method_needs(sc)
        extra = [f"max_similarity {sc.max_similarity} over {s.feature}" if need.vectors else "",
                 "target set scored" if need.target else ""]
        lines.append(f"  select          {sc.method}, budget {sc.budget}"
                     + "".join(f"; {x}" for x in extra if x))
    return "\n".join(lines)


def _shown(loc: storage.Location) -> str:
    """A path as the user would type it: relative to the working folder when inside it."""
    if storage.is_remote(loc):
        return str(loc)
    try:
        return str(loc.relative_to(Path.cwd()))
    except (ValueError, OSError):  # elsewhere; or no working folder (a Ray job's may be gone by now)
        return str(loc)


def summary(runner) -> str:
    """A short human summary of what the run directory holds (``runner``: a grads_ray.runner.Runner)."""
    m = runner.manifest
    st = m.get("stages", {})
    lines = [f"grads-ray: output in {_shown(runner.run_dir)}"]
    acc = m.get("accounting")
    if acc:
        reasons = ", ".join(f"{k} {v}" for k, v in m.get("rejected_by_reason", {}).items()) or "none"
        lines.append(f"  input rows      {acc['input_rows']}  (rejected {acc['rejected_ingest'] + acc['rejected_score']}: {reasons})")
        sc = st.get("score", {})
        flags = ", ".join(f"{sc[k]} {label}" for k, label in (("truncated", "truncated to max_length"),
                                                              ("nonfinite", "not finite, never selected"))
                          if sc.get(k))
        used = "+".join(sc.get("engine_used") or []) or sc.get("engine", "?")
        lines.append(f"  scored          {acc['scored']}  ({sc.get('examples_per_s', '?')} examples/s, {used} engine"
                     + (f"; {flags}" if flags else "") + ")")
        for c in sc.get("self_check", []):
            if c.get("engine") == "loop" and c.get("reason") != "score.engine=loop":
                lines.append(f"  one at a time   {c['reason'][:160]}")
                break
        if st.get("ingest", {}).get("empty_inputs"):
            lines.append(f"  empty inputs    {', '.join(st['ingest']['empty_inputs'][:5])}")
    if "similarity" in st:
        s = st["similarity"]
        lines.append(f"  near-duplicates {s.get('rows_in_dup_groups', 0)} rows in {s.get('dup_groups', 0)} groups ({s.get('index')})")
    if "select" in st:
        s = st["select"]
        frac = s["selected"] / max(s["scored"], 1)
        lines.append(f"  selected        {s['selected']} of {s['scored']} ({frac:.1%}; {s['selected_tokens']} of "
                     f"{s['total_tokens']} tokens) by {s['method']}, budget {s['budget']}")
    ev = st.get("evaluate")
    if ev:
        b, a = ev["before"], ev["after"]
        for key, label, what in (("domain_loss", "domain loss ", "held-out rows of the corpus: a fall is what was learned"),
                                 ("general_loss", "general loss", "general text: a rise is what was forgotten")):
            if key in b and key in a:
                lines.append(f"  {label}    {b[key]:.4f} -> {a[key]:.4f}  ({ev.get(key + '_rel_change', 0):+.1%}; {what})")
        if "bleu" in b and "bleu" in a:
            names = (("chrf", "chrF"), ("bleu", "BLEU"), ("rougeL", "ROUGE-L"), ("meteor", "METEOR"))
            lines.append("  generation      " + ", ".join(f"{name} {b[k]:.1f} -> {a[k]:.1f}" for k, name in names
                                                          if k in b and k in a)
                         + (", METEOR absent (eval.json says why)" if "meteor_absent" in a else "")
                         + f"  (0-100: greedy answers to {a['generated_examples']} held-out prompts against their "
                         "reference answers)")
    timing = ", ".join(f"{k} {v['seconds']:.0f}s" for k, v in st.items() if "seconds" in v)
    if m.get("ray_start_seconds"):
        timing += f" (and Ray's start-up {m['ray_start_seconds']:.0f}s)"
    lines.append(f"  stage times     {timing}")
    if (runner.run_dir / "selected.jsonl").exists():
        lines.append(f"  selected subset {_shown(runner.run_dir / 'selected.jsonl')}")
    return "\n".join(lines)
