"""The fine-tune's data path, one epoch: the subset the select stage wrote against the whole corpus
filtered by the selected ids (what an epoch read before issue 20).

Both sides build the dataset the trainer iterates (read -> tokenize in CPU tasks -> rejected rows
dropped) and iterate it once in batches of 32, without training, on a local Ray of the machine's
CPUs, after one untimed pass over a rows part (workers started, tokenizer loaded):
- ``subset``: ``grads_ray.stages.train.training_dataset`` on ``select/part-*`` (the fine-tune's
  input: the selected rows, shuffled once);
- ``corpus``: the same function on every ``rows/part-*`` with the filter the fine-tune used to run
  each epoch (the selected id set put in the object store, fetched with ``ray.get`` in every batch
  and tested row by row), kept here verbatim as the baseline.
The run folder is one ``benchmarks/scale.py --keep`` left (rows and scores of N rows; synthetic
scores are enough: no model is run, only its tokenizer); for each budget the select stage is run
there (``python -m grads_ray select ... select.budget=B``), then both sides are timed. ``ratio`` =
corpus seconds / subset seconds: what the subset saves an epoch; the subset's seconds grow with the
selected rows, the corpus side's with the corpus.

    python benchmarks/scale.py --rows 100000 --stages ingest,similarity,select --keep   # once
    python benchmarks/finetune_data.py --run runs/scale/run-100000-synthetic
    python benchmarks/finetune_data.py --quick   # 10^4 rows: makes its run folder if missing

Last line: one JSON object, per budget the selected rows, both sides' seconds and rows/s, and the ratio.
"""

from __future__ import annotations

import argparse
import json
import logging
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def old_pick(batch: dict[str, np.ndarray], ids=None) -> dict[str, np.ndarray]:
    """The fine-tune's filter before issue 20: the selected id set from the object store in every
    batch, each row tested against it in Python."""
    import ray

    wanted = ray.get(ids) if isinstance(ids, ray.ObjectRef) else ids
    keep = np.array([i in wanted for i in batch["id"]], dtype=bool)
    return {k: v[keep] for k, v in batch.items()}


def one_epoch(ds) -> tuple[int, float]:
    """Iterate ``ds`` once as the trainer's loader would (batches of 32). -> (rows, seconds)."""
    t0 = time.perf_counter()
    n = 0
    for batch in ds.iter_batches(batch_size=32, batch_format="numpy"):
        n += len(batch["input_ids"])
    return n, time.perf_counter() - t0


def corpus_dataset(rows_files: list[str], ids_ref, cfg):
    """The whole corpus, filtered per batch by the selected ids (the old path), then as the subset."""
    import ray

    from grads_ray.data.tokenize import tokenize
    from grads_ray.stages.train import training_columns

    ds = ray.data.read_parquet(rows_files).select_columns(["id", "record"])
    ds = ds.map_batches(old_pick, batch_format="numpy", fn_kwargs={"ids": ids_ref})
    ds = tokenize(ds, model_path=cfg.model.path, max_length=cfg.data.max_length, on_long=cfg.data.on_long,
                  batch_size=cfg.score.tokenize_batch_size, trust_remote_code=cfg.model.trust_remote_code)
    return ds.map_batches(training_columns, batch_format="numpy")


def select(run: Path, budget: str) -> None:
    """The select stage of ``run`` at ``budget`` (its own process, as a user would run it)."""
    cmd = [sys.executable, "-m", "grads_ray", "select", "--config", str(run / "config.yaml"), "--output", str(run),
           f"select.budget={budget}"]
    got = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT)
    if got.returncode:
        raise SystemExit(f"select at {budget} failed ({got.returncode}):\n{got.stderr[-3000:]}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--run", help="a run folder with rows and scores (default: scale.py's synthetic one of N rows)")
    ap.add_argument("--quick", action="store_true", help="10^4 rows, budgets 10%%,50%%")
    ap.add_argument("--budgets", help="select.budget values, comma-separated (default 10%%,25%%,100%%)")
    a = ap.parse_args()
    rows = 10**4 if a.quick else 10**5
    run = Path(a.run) if a.run else ROOT / "runs" / "scale" / f"run-{rows}-synthetic"
    if not (run / "config.yaml").exists():
        subprocess.run([sys.executable, str(ROOT / "benchmarks" / "scale.py"), "--rows", str(rows), "--stages",
                        "ingest,similarity,select", "--keep"], check=True, cwd=ROOT)
    budgets = (a.budgets or ("10%,50%" if a.quick else "10%,25%,100%")).split(",")

    import pyarrow.parquet as pq
    import ray

    from grads_ray.config import load_config
    from grads_ray.rundir import StageDir
    from grads_ray.selection.writing import selected_rows
    from grads_ray.stages.train import training_dataset

    cfg = load_config(str(run / "config.yaml"), [])
    rows_files = [str(p) for p in StageDir(run, "rows").parts()]
    ray.init(address="local", include_dashboard=False, log_to_driver=False)
    ray.data.DataContext.get_current().enable_progress_bars = False
    ctx = ray.data.DataContext.get_current()
    ctx.execution_options.preserve_order = True  # as the job runs
    ctx.print_on_execution_start = False
    logging.getLogger("ray.data").setLevel(logging.WARNING)
    results = {}
    try:
        one_epoch(training_dataset(rows_files[:1], None, cfg))  # warm-up: workers start, tokenizer loads
        for budget in budgets:
            select(run, budget)
            sel = pq.read_table(run / "selection.parquet", columns=["id", "selected"])
            ids = set(sel.filter(sel["selected"])["id"].to_pylist())
            k_sub, t_sub = one_epoch(training_dataset(selected_rows(StageDir(run, "select")), None, cfg))
            k_all, t_all = one_epoch(corpus_dataset(rows_files, ray.put(ids), cfg))
            assert k_sub == k_all, (k_sub, k_all)  # the same rows either way
            results[budget] = {"selected": len(ids), "subset_s": round(t_sub, 2), "corpus_s": round(t_all, 2),
                               "subset_rows_per_s": round(k_sub / t_sub, 1),
                               "ratio": round(t_all / t_sub, 2)}
            print(f"budget {budget:>5}: {len(ids):>7,} rows  subset {t_sub:7.1f} s  corpus filtered {t_all:7.1f} s"
                  f"  ratio {t_all / t_sub:5.2f}", flush=True)
    finally:
        ray.shutdown()
    print(json.dumps({"corpus_rows": sum(pq.read_metadata(f).num_rows for f in rows_files), "by_budget": results}))


if __name__ == "__main__":
    main()
