"""Which score engine each model family gets, and how exact it is: the coverage table of
docs/model_coverage.md.

For each family, a tiny random model from its own config class (tests/families.py), saved and loaded:
- ``float64``: the batched engine against the float64 one-example-at-a-time reference (autograd),
  largest relative error over every statistic written (loss, grad_* overall and per group);
- the self-check in float32, as a scorer runs it: its verdict (batched, or the loop and why) and
  its largest errors on the written numbers and on the parameters' own moments.
A family is "silently wrong" when the check passes while the float64 comparison is over 1e-5: the
count must be 0.

    python benchmarks/model_coverage.py --quick          # the families the tests check (tests/families.py)
    python benchmarks/model_coverage.py --all            # + every causal-LM family of the installed
                                                           transformers, shrunk generically (minutes)
    ... --write docs/model_coverage.md                   # the table, between its markers

The last line printed is one JSON object of the headline figures.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys
import tempfile
import time
import warnings
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

START, END = "<!-- coverage:start -->", "<!-- coverage:end -->"


def measure(family: str) -> dict:
    """One family, in this process -> its row."""
    import logging

    import torch

    warnings.filterwarnings("ignore")
    logging.disable(logging.WARNING)
    from grads_ray.gradients.engine import BatchedGradStats
    from grads_ray.gradients.rules import UnsupportedModel
    from grads_ray.gradients.selfcheck import build_engine, synthetic_examples
    from tests.families import VOCAB, build_family, eager_experts
    from tests.reference import STATS, pad, random_examples, reference, scale_of

    row = {"family": family}
    try:
        with tempfile.TemporaryDirectory() as d:
            model = build_family(family, Path(d) / "m")
    except Exception as exc:  # noqa: BLE001 - a family whose tiny config does not build here
        return {**row, "verdict": "no tiny model", "reason": f"{type(exc).__name__}: {str(exc)[:160]}"}
    row["arch"] = type(model).__name__
    try:  # the model's own forward at this size, before the engine is asked anything
        with torch.no_grad():
            model(input_ids=torch.tensor([[3, 5, 7, 11, 13]]), attention_mask=torch.ones((1, 5), dtype=torch.long),
                  use_cache=False)
    except Exception as exc:  # noqa: BLE001 - a tiny config this family does not run with
        return {**row, "verdict": "no tiny model", "reason": f"its own forward: {type(exc).__name__}: {str(exc)[:140]}"}
    t0 = time.perf_counter()
    engine, check = build_engine(model, {"engine": "auto", "proj_dim": 32, "proj_rank": 4, "fisher_dim": 0},
                                 synthetic_examples(VOCAB - 7, n=4, seed=1), pad_id=0)
    row["check_seconds"] = round(time.perf_counter() - t0, 2)
    row["verdict"] = check.engine
    row["reason"] = check.reason
    row["check_errors"] = check.errors
    row["rules"] = sorted({e.rule for u in engine.uses for e in u.entries}) if isinstance(engine, BatchedGradStats) \
        else []
    try:  # the float64 truth, whatever the check said
        model64 = eager_experts(model).double()
        eng64 = BatchedGradStats(model64, proj_dim=0, fisher_dim=0)
        examples = random_examples(4, seed=7, vocab=VOCAB - 7, lo=4, hi=21)
        out = eng64(*pad(examples, "right"))
        worst = 0.0
        for i, (x, y) in enumerate(examples):
            ref = reference(model64, x, y)
            for key in ["loss"] + [k for k in ref if k.split(".")[-1] in STATS]:
                err = abs(out.columns[key][i] - ref[key]) / max(scale_of(ref, key), 1e-300)
                worst = max(worst, err if not math.isnan(err) else math.inf)
        row["float64_error"] = worst
        if not row["rules"]:
            row["rules"] = sorted({e.rule for u in eng64.uses for e in u.entries})
    except UnsupportedModel as exc:
        row["float64_error"] = None
        row["float64_note"] = str(exc)[:160]
    except Exception as exc:  # noqa: BLE001 - e.g. a kernel with no float64 version
        row["float64_error"] = None
        row["float64_note"] = f"{type(exc).__name__}: {str(exc)[:160]}"
    row["silently_wrong"] = bool(row["verdict"] == "batched" and row.get("float64_error") is not None
                                 and row["float64_error"] > 1e-5)
    del torch
    return row


def _in_subprocess(family: str, timeout: float) -> dict:
    try:
        proc = subprocess.run([sys.executable, __file__, "--one", family], capture_output=True, text=True,
                              timeout=timeout, cwd=ROOT, env={**os.environ, "TRANSFORMERS_VERBOSITY": "error"})
    except subprocess.TimeoutExpired:
        return {"family": family, "verdict": "no tiny model", "reason": f"over {timeout:.0f} s on this machine"}
    lines = [x for x in proc.stdout.splitlines() if x.startswith("{")]
    if not lines:
        return {"family": family, "verdict": "no tiny model", "reason": (proc.stderr.strip().splitlines() or ["?"])[-1][:160]}
    return json.loads(lines[-1])


def _fmt(x) -> str:
    return "—" if x is None else ("inf" if x == math.inf else f"{x:.0e}" if x else "0")


def table(rows: list[dict], families: dict) -> str:
    out = ["| family | what it exercises | engine | rules | float64 error | float32 check: written / parameters |",
           "| --- | --- | --- | --- | --- | --- |"]
    for r in rows:
        about = families.get(r["family"], ("",))[0]
        if r["verdict"] == "no tiny model":
            continue
        errs = r.get("check_errors") or {}
        written = max([v for k, v in errs.items() if k != "parameters"], default=None)
        engine = "batched" if r["verdict"] == "batched" else f"loop: {r['reason'][:90]}"
        out.append(f"| {r['family']} | {about} | {engine} | {', '.join(r.get('rules', []))} | "
                   f"{_fmt(r.get('float64_error'))} | {_fmt(written)} / {_fmt(errs.get('parameters'))} |")
    return "\n".join(out)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="the tested families only (the default)")
    parser.add_argument("--all", action="store_true", help="every causal-LM family of the installed transformers")
    parser.add_argument("--one", help=argparse.SUPPRESS)
    parser.add_argument("--timeout", type=float, default=120.0, help="seconds per family (--all)")
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--write", help="replace the table between the markers of this markdown file")
    args = parser.parse_args()
    if args.one:
        print(json.dumps(measure(args.one), default=float))
        return
    from tests.families import FAMILIES

    names = list(FAMILIES)
    if args.all:
        from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

        names += sorted(n for n in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES if n not in FAMILIES)
    t0 = time.time()
    with ThreadPoolExecutor(args.workers) as pool:
        rows = list(pool.map(lambda n: _in_subprocess(n, args.timeout), names))
    for r in rows:
        print(f"{r['family']:24s} {r['verdict']:14s} f64 {_fmt(r.get('float64_error')):>6s} "
              f"{'SILENTLY WRONG ' if r.get('silently_wrong') else ''}{r.get('reason', '')[:110]}", flush=True)
    built = [r for r in rows if r["verdict"] != "no tiny model"]
    batched = [r for r in built if r["verdict"] == "batched"]
    moe = [r for r in batched if "experts" in r.get("rules", [])]
    if args.write:
        import transformers

        path = Path(args.write)
        text = path.read_text()
        body = (f"{START}\nMeasured {time.strftime('%Y-%m-%d')} on this machine's CPU, transformers "
                f"{transformers.__version__}, by `python benchmarks/model_coverage.py{' --all' if args.all else ''} "
                f"--write {args.write}`.\n\n{table(rows, FAMILIES)}\n{END}")
        path.write_text(text[:text.index(START)] + body + text[text.index(END) + len(END):] if START in text
                        else text + "\n" + body + "\n")
    summary = {"families": len(names), "built": len(built), "batched_exact": len(batched),
               "batched_moe": len(moe), "loop": len(built) - len(batched),
               "silently_wrong": sum(bool(r.get("silently_wrong")) for r in rows),
               "max_float64_error_batched": max((r.get("float64_error") or 0.0 for r in batched), default=0.0),
               "seconds": round(time.time() - t0, 1)}
    print(json.dumps(summary))


if __name__ == "__main__":
    main()
