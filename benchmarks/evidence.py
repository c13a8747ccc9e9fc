"""Evidence: does GrADS make a model learn more and forget less? A miniature, offline reproduction.

    python benchmarks/evidence.py --quick     # a few CPU minutes: 1 seed, 5% budget, 4 strategies
    python benchmarks/evidence.py             # 3 seeds x {5, 10, 50}% x 7 strategies, both views
    python benchmarks/evidence.py --doc docs/evidence   # also writes docs/evidence/<label>.md + plots
    python benchmarks/evidence.py --ablation --doc docs/evidence   # GrADS's parts and warm-up, 3 seeds, 5%

Setting (everything from text this machine has; nothing downloaded):
- general text: the Linux manual pages (Debian ``manpages``, ``manpages-dev``; grads_ray/demo/manpages.py),
  split by page into a pre-training part and a held-out part (the forgetting test set);
- base model: a small Llama-style model pre-trained here, with Ray Train, on the pre-training part;
- domain SFT corpus: the Python standard library's docstrings and ``pydoc_data`` topics as
  instruction -> answer pairs (grads_ray/demo/corpus.py), a held-out split by a hash of the id, and a
  documented share of planted noisy pairs in the training split (answers swapped between questions,
  answers truncated; grads_ray/demo/noise.py).

Experiment: ``grads-ray compare`` over full / random / GrADS / FisherSFT / loss / IFD / LESS-style at
each budget and seed, from the same base model, in two views of the training recipe: ``epochs``
(the same epochs over each subset) and ``steps`` (the same optimizer steps for every run, cycling the
subset). Reported per strategy and budget: held-out domain loss, BLEU, chrF, ROUGE-L on greedy
generations, general held-out loss before/after (forgetting), the share of planted noisy pairs in the
selection, wall time of each stage. The last line is one JSON object of headline figures.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import logging
import math
import platform
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

SCALES = {
    # pre-training corpus (characters of man pages), model, steps; domain rows; evaluation sizes
    "quick": {"general_chars": 1_500_000, "hidden": 64, "layers": 2, "heads": 4, "vocab": 2048, "block": 128,
              "pretrain_epochs": 1, "pretrain_batch": 16, "domain_rows": 1500, "max_length": 192,
              "general_blocks": 48, "generate": 16, "max_new_tokens": 24, "code_rows": 1500},
    "cpu": {"general_chars": 8_000_000, "hidden": 128, "layers": 4, "heads": 4, "vocab": 4096, "block": 128,
            "pretrain_epochs": 1, "pretrain_batch": 16, "domain_rows": 1500, "max_length": 256,
            "general_blocks": 128, "generate": 32, "max_new_tokens": 32, "code_rows": 0},
    # the code domain on 2 CPU cores: a model as small as quick's (the 3 seeds' ~45 fine-tunes must fit
    # about an hour) and 6,000 of the library's pairs, four times the docs domain
    "code": {"general_chars": 3_000_000, "hidden": 64, "layers": 2, "heads": 4, "vocab": 4096, "block": 128,
             "pretrain_epochs": 1, "pretrain_batch": 16, "domain_rows": 1500, "max_length": 256,
             "general_blocks": 96, "generate": 32, "max_new_tokens": 48, "code_rows": 6000},
    "gpu": {"general_chars": 29_000_000, "hidden": 512, "layers": 8, "heads": 8, "vocab": 8192, "block": 256,
            "pretrain_epochs": 2, "pretrain_batch": 32, "domain_rows": 0, "max_length": 512,
            "general_blocks": 256, "generate": 128, "max_new_tokens": 64, "code_rows": 0},
}
NOISE = {"swapped": 0.10, "truncated": 0.10}  # shares of the training split, planted on disjoint rows
METHODS = ("random", "grads", "fisher", "loss", "ifd", "less")


def _hash(text: str) -> int:
    return int.from_bytes(hashlib.sha256(text.encode()).digest()[:8], "big")


# ------------------------------------------------------------------------------------------ data
def build_data(work: Path, scale: dict, seed: int = 0, domain: str = "docs") -> dict:
    """The corpora on disk under ``work/data`` (skipped when there). -> paths and counts.
    ``domain``: ``docs`` (docstring and reference pairs, grads_ray/demo/corpus.py) or ``code`` (the
    library's functions and classes as instruction -> code, grads_ray/demo/code_corpus.py, with the
    library's documentation added to the pre-training text)."""
    from grads_ray.demo.code_corpus import code_rows, documentation_text
    from grads_ray.demo.corpus import general_split, sft_rows
    from grads_ray.demo.noise import plant_noise

    data = work / "data"
    info_path = data / "info.json"
    if info_path.exists():
        return json.loads(info_path.read_text())
    data.mkdir(parents=True, exist_ok=True)
    # man pages (else the licence texts): pre-training pages, and other pages for the forgetting test
    general = general_split(scale["general_chars"], seed=seed)
    docs = documentation_text() if domain == "code" else ""
    (data / "pretrain.txt").write_text(general["train"] + (f"\n\n{docs}" if docs else ""))
    (data / "general_test.txt").write_text(general["test"])  # seeded order: the first blocks span pages

    rows = code_rows()[0] if domain == "code" else sft_rows()
    limit = scale["code_rows" if domain == "code" else "domain_rows"]
    if limit:
        rows = sorted(rows, key=lambda r: _hash(f"pick:{r['id']}"))[:limit]
        rows.sort(key=lambda r: r["id"])
    # 5% held out (the test set), 2.5% as LESS-style's target set (never the test set), the rest trains
    split = {r["id"]: _hash("heldout:" + r["id"]) % 40 for r in rows}
    held = [r for r in rows if split[r["id"]] in (0, 1)]
    target = [r for r in rows if split[r["id"]] == 2]
    train = [r for r in rows if split[r["id"]] > 2]
    noisy_rows, kinds = plant_noise(train, NOISE["swapped"], NOISE["truncated"], seed=seed)
    (data / "corpus").mkdir(exist_ok=True)
    (data / "corpus" / "train.jsonl").write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in noisy_rows))
    (data / "heldout.jsonl").write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in held))
    (data / "target.jsonl").write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in target))
    (data / "noise.json").write_text(json.dumps(kinds, indent=0))
    info = {"domain": domain, "general_source": general["source"], "pages_train": general["pages_train"],
            "documentation_chars": len(docs),
            "pages_test": general["pages_test"], "pretrain_chars": general["train_chars"],
            "general_test_chars": general["test_chars"],
            "domain_train": len(train), "domain_heldout": len(held), "domain_target": len(target),
            "noisy": {k: sum(v == k for v in kinds.values()) for k in NOISE},
            "corpus": str(data / "corpus"), "heldout": str(data / "heldout.jsonl"),
            "general_test": str(data / "general_test.txt"), "target": str(data / "target.jsonl"), "pretrain": str(data / "pretrain.txt"),
            "noise": str(data / "noise.json")}
    info_path.write_text(json.dumps(info, indent=2))
    return info


# ------------------------------------------------------------------------------------ pre-training
def pretrain(work: Path, data: dict, scale: dict, use_gpu: bool, seed: int = 0) -> dict:
    """Tokenizer (on both corpora) and a small Llama pre-trained on the man pages with Ray Train, in
    ``work/base`` (skipped when there). -> {path, params, tokens, seconds, loss}."""
    import ray

    from grads_ray.config import TrainConfig
    from grads_ray.demo.model import build_model, train_tokenizer
    from grads_ray.training.trainer import train

    base = work / "base"
    info_path = work / "base.json"
    if info_path.exists() and (base / "config.json").exists():
        return json.loads(info_path.read_text())
    t0 = time.time()
    general = Path(data["pretrain"]).read_text()
    domain = [json.loads(x) for x in (Path(data["corpus"]) / "train.jsonl").read_text().splitlines()]
    texts = general.split("\n\n") + [r["prompt"] + "\n" + r["response"] for r in domain]
    tok = train_tokenizer(texts, vocab_size=scale["vocab"])
    model = build_model(tok, hidden_size=scale["hidden"], layers=scale["layers"], heads=scale["heads"],
                        max_positions=max(1024, scale["max_length"]), seed=seed)
    init = work / "init"
    model.save_pretrained(init)
    tok.save_pretrained(init)
    ids = tok(general)["input_ids"]
    b = scale["block"]
    blocks = [ids[i:i + b] for i in range(0, len(ids) - b + 1, b)]
    ds = ray.data.from_items([{"input_ids": x, "labels": x} for x in blocks])
    cfg = TrainConfig(epochs=scale["pretrain_epochs"], batch_size=scale["pretrain_batch"], lr=3e-3,
                      warmup_ratio=0.05, checkpoint_every=0, use_gpu="true" if use_gpu else "false")
    metrics = train(ds, len(blocks), str(init), base, cfg, name=f"pretrain-{seed}", storage_path=work / "ray_train",
                    seed=seed, use_gpu=use_gpu)
    info = {"path": str(base), "params": sum(p.numel() for p in model.parameters()), "tokens": len(blocks) * b,
            "blocks": len(blocks), "seconds": round(time.time() - t0, 1),
            "first_loss": round(metrics.get("first_loss") or math.nan, 3),
            "last_loss": round(metrics.get("train_loss") or math.nan, 3)}
    info_path.write_text(json.dumps(info, indent=2))
    return info


# ------------------------------------------------------------------------------------------ runs
def compare_config(work: Path, data: dict, base: dict, scale: dict, view: str, strategies: list[str],
                   seeds: list[int], steps: int | None, use_gpu: bool, warmup: float = 0.1, folder: str | None = None):
    from grads_ray.config import load_config

    gpu = "true" if use_gpu else "false"
    overrides = [
        f"output={work / (folder or 'compare-' + view)}", f"model.path={base['path']}", f"data.paths=[{data['corpus']}]",
        f"data.max_length={scale['max_length']}", "data.shard_rows=500",
        f"warmup.fraction={warmup}", "warmup.epochs=1", "warmup.batch_size=16", "warmup.lr=0.002", f"warmup.use_gpu={gpu}",
        "score.batch_size=16", f"score.use_gpu={gpu}", "score.response_only_loss=true",
        "finetune.batch_size=16", "finetune.lr=0.002", f"finetune.use_gpu={gpu}", "finetune.checkpoint_every=0",
        f"select.less.target_paths=[{data['target']}]",
        f"eval.domain_paths=[{data['heldout']}]", f"eval.general_paths=[{data['general_test']}]",
        f"eval.max_general_blocks={scale['general_blocks']}", f"eval.generate={scale['generate']}",
        f"eval.max_new_tokens={scale['max_new_tokens']}", f"eval.block_size={scale['block']}",
        f"compare.strategies=[{', '.join(strategies)}]", f"compare.seeds=[{', '.join(map(str, seeds))}]",
    ]
    if view == "epochs":
        overrides.append("finetune.epochs=2")
    else:  # the same optimizer steps for every run: small subsets cycle, the full corpus sees a part
        overrides += ["finetune.epochs=1000", f"finetune.max_steps={steps}"]
    return load_config(None, overrides)


def share_upstream(src_root: Path, dst_root: Path, seeds: list[int]) -> None:
    """The steps view starts from the epochs view's shared stages (hard links; fingerprints match)."""
    from grads_ray import storage
    from grads_ray.compare import shared_folders
    from grads_ray.config import Config

    for seed in seeds:
        for stage in shared_folders(Config()):
            src, dst = src_root / f"seed-{seed}" / stage, dst_root / f"seed-{seed}" / stage
            if (src / ".ledger" / "SUCCESS.json").exists() and not dst.exists():
                storage.copy_tree(src, dst)


def noisy_share(run_dir: Path, noisy: set[str]) -> float:
    import pyarrow.parquet as pq

    t = pq.read_table(run_dir / "selection.parquet", columns=["id", "selected"])
    chosen = t.filter(t["selected"])["id"].to_pylist()
    return sum(i in noisy for i in chosen) / max(len(chosen), 1)


def manifest_stages(run_dir: Path) -> dict[str, dict]:
    return json.loads((run_dir / "manifest.json").read_text()).get("stages", {})


def stage_seconds(stages: dict[str, dict]) -> dict[str, float]:
    """Each stage's time in the run that computed it (``computed_seconds``; a stage found finished, or
    linked from the seed's shared stages, shows ~0 s as this run's ``seconds``)."""
    times = {k: v.get("computed_seconds", v.get("seconds")) for k, v in stages.items()}
    return {k: sec for k, sec in times.items() if sec is not None}


def collect(view_root: Path, result: dict, noisy: set[str]) -> list[dict]:
    """comparison.json's runs, with the noisy share and stage times of each."""
    rows = []
    for r in result["runs"]:
        seed_dir = view_root / f"seed-{r['seed']}"
        run_dir = seed_dir / r["strategy"]
        stages = manifest_stages(run_dir)
        shared, own = stage_seconds(manifest_stages(seed_dir)), stage_seconds(stages)
        times = {k: v for k, v in own.items() if k not in shared}  # the run's own stages; the seed's are shared
        steps = stages["finetune"].get("metrics") or {}
        warm = stages.get("warmup", {}).get("metrics") or {}
        rows.append({**r, "noisy_share": noisy_share(run_dir, noisy), "seconds": times,
                     "finetune_steps": steps.get("total_steps"), "warmup_steps": warm.get("total_steps")})
    return rows


# --------------------------------------------------------------------------------------- report
def _ms(values: list[float]) -> tuple[float, float]:
    v = [x for x in values if x is not None and not (isinstance(x, float) and math.isnan(x))]
    if not v:
        return math.nan, math.nan
    return statistics.fmean(v), statistics.stdev(v) if len(v) > 1 else 0.0


def summarize(rows: list[dict]) -> list[dict]:
    """Mean and sample sd over seeds per (strategy), in the order met."""
    out = []
    for label in dict.fromkeys(r["strategy"] for r in rows):
        rs = [r for r in rows if r["strategy"] == label]
        get = lambda key, when="after", rs=rs: [(r.get(when) or {}).get(key) for r in rs]  # noqa: E731
        out.append({
            "strategy": label, "method": rs[0]["method"], "budget": rs[0]["budget"], "seeds": len(rs),
            "share": statistics.fmean(r["selected_share"] for r in rs),
            "domain_loss": _ms(get("domain_loss")), "domain_loss_before": _ms(get("domain_loss", "before")),
            "bleu": _ms(get("bleu")), "chrf": _ms(get("chrf")), "rougeL": _ms(get("rougeL")),
            "meteor": _ms(get("meteor")),
            "general_loss": _ms(get("general_loss")), "general_loss_before": _ms(get("general_loss", "before")),
            "forgetting": _ms([r.get("forgetting") for r in rs]),
            "noisy_share": _ms([r["noisy_share"] for r in rs]),
            "finetune_s": _ms([r["seconds"].get("finetune") for r in rs]),
        })
    return out


def _fmt(pair: tuple[float, float], digits: int = 3) -> str:
    m, s = pair
    return "–" if math.isnan(m) else f"{m:.{digits}f} ± {s:.{digits}f}"


def table(summary: list[dict]) -> str:
    lines = ["| strategy | share | domain loss | BLEU | chrF | ROUGE-L | METEOR | general loss | forgetting | noisy share "
             "| fine-tune s |", "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    for s in summary:
        lines.append(f"| {s['strategy']} | {s['share']:.1%} | {_fmt(s['domain_loss'])} | {_fmt(s['bleu'], 2)} | "
                     f"{_fmt(s['chrf'], 2)} | {_fmt(s['rougeL'], 2)} | {_fmt(s.get('meteor', (math.nan, math.nan)), 2)} | "
                     f"{_fmt(s['general_loss'])} | "
                     f"{_fmt(s['forgetting'], 4)} | {_fmt(s['noisy_share'], 3)} | {_fmt(s['finetune_s'], 0)} |")
    return "\n".join(lines)


def plots(views: dict[str, list[dict]], out: Path, label: str) -> list[str]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = []
    for key, ylabel, stem in (("domain_loss", "held-out domain loss after fine-tuning", "domain"),
                              ("forgetting", "forgetting: relative change of general loss", "forgetting")):
        fig, axes = plt.subplots(1, len(views), figsize=(5.5 * len(views), 4), squeeze=False)
        for ax, (view, summary) in zip(axes[0], views.items(), strict=True):
            full = [s for s in summary if s["strategy"] == "full"]  # ("full" runs the random method at 100%)
            subsets = [s for s in summary if s["strategy"] != "full"]
            for method in dict.fromkeys(s["method"] for s in subsets):
                pts = sorted((100 * s["share"], *s[key]) for s in subsets if s["method"] == method)
                ax.errorbar([p[0] for p in pts], [p[1] for p in pts], yerr=[p[2] for p in pts], marker="o",
                            capsize=3, label=method)
            for s in full:
                ax.axhline(s[key][0], color="k", ls="--", lw=1, label="full corpus")
            ax.set_xscale("log")
            ax.set_xlabel("selected share of the corpus (%)")
            ax.set_ylabel(ylabel)
            ax.set_title(f"{view} view")
            ax.grid(alpha=0.3)
            ax.legend(fontsize=7)
        fig.tight_layout()
        name = f"{label}-{stem}.png"
        fig.savefig(out / name, dpi=100)
        plt.close(fig)
        names.append(name)
    return names


def headline(views: dict[str, list[dict]]) -> dict:
    """The figures the JSON line carries, from the epochs view (and the steps view's where present)."""
    out: dict = {}
    for view, summary in views.items():
        by = {s["strategy"]: s for s in summary}
        full = by.get("full")
        tag = "" if view == "epochs" else f"_{view}"
        for label in by:
            if not label.startswith("grads-"):
                continue
            b = label.split("-", 1)[1].replace("pct", "")
            g = by[label]
            if full:
                out[f"grads{b}_vs_full_domain_loss_ratio{tag}"] = round(g["domain_loss"][0] / full["domain_loss"][0], 4)
            rnd = by.get(f"random-{b}pct")
            if rnd:
                out[f"grads{b}_vs_random_domain_loss_ratio{tag}"] = round(g["domain_loss"][0] / rnd["domain_loss"][0], 4)
                out[f"noisy_share_random{b}{tag}"] = round(rnd["noisy_share"][0], 4)
            out[f"forgetting_grads{b}{tag}"] = round(g["forgetting"][0], 4)
            out[f"noisy_share_grads{b}{tag}"] = round(g["noisy_share"][0], 4)
        if full:
            out[f"forgetting_full{tag}"] = round(full["forgetting"][0], 4)
    return out


def write_report(path: Path, label: str, meta: dict, views: dict[str, list[dict]], pngs: list[str]) -> None:
    d, b = meta["data"], meta["base"]
    lines = [f"# Evidence run `{label}`", "",
             f"{meta['date']}, {meta['machine']}; {meta['seconds'] / 60:.0f} min in all.", "",
             f"- general text: {d['general_source']}: {d['pages_train']} pages ({d['pretrain_chars']:,} characters) "
             f"to pre-train, {d['pages_test']} other pages held out ({d['general_test_chars']:,} characters; the "
             "first blocks measure forgetting)",
             f"- base model: Llama-style, {b['params']:,} parameters, pre-trained here on {b['tokens']:,} tokens "
             f"(train loss {b['first_loss']} -> {b['last_loss']}, {b['seconds']:.0f} s)",
             f"- domain: {d['domain_train']} training pairs "
             + ("of the standard library's functions and classes (instruction -> code), "
                if d.get("domain") == "code" else "from Python's documentation, ") + "of which "
             f"{d['noisy']['swapped']} with swapped answers and {d['noisy']['truncated']} with truncated answers "
             f"(planted); {d['domain_heldout']} held-out pairs (the test set); {d['domain_target']} pairs as "
             "LESS-style's target set",
             f"- seeds {meta['seeds']}; mean ± sample sd over seeds. Share: of the scored training pairs."
             + (f" Seeds ran {meta['jobs']} at a time (own process and local Ray each), so the stage times "
                "include their contention for the cores." if meta.get("jobs", 1) > 1 else ""), ""]
    for view, summary in views.items():
        recipe = ("2 epochs over each subset" if view == "epochs"
                  else "budgets in training tokens, the same for every method, 2 epochs over each subset"
                  if view == "tokens" else f"{meta['steps']} optimizer steps for every run (the subset cycled; the smallest budget's "
                       "runs are the epochs view's, whose 2 epochs are these steps)")
        lines += [f"## {view} view: {recipe}", "", table(summary), ""]
    lines += ["## Stage wall times (seconds, mean ± sd over the runs that ran the stage)", "",
              "| stage | " + " | ".join(meta["stage_seconds"]) + " |",
              "| --- |" + " --- |" * len(meta["stage_seconds"]),
              "| seconds | " + " | ".join(_fmt(v, 1) for v in meta["stage_seconds"].values()) + " |", ""]
    lines += [f"![domain loss]({pngs[0]})", "", f"![forgetting]({pngs[1]})", "",
              "```json", json.dumps(meta["headline"], indent=1), "```", ""]
    path.write_text("\n".join(lines))


# -------------------------------------------------------------------------------------- ablation
# issue 22: GrADS's core (the paper's signal + KDE) with each of our additions switched on alone, and
# the warm-up's length; variants are grads_ray/selection/variants.py's expressions.
ABLATION_VARIANTS = ("all", "core", "core+band", "core+diversity", "core+redundancy", "core+clusters",
                     "core+dedup", "core+norm", "all+norm", "all-diversity", "all-diversity-clusters")
WARMUP_VARIANTS = ("all", "core", "core+norm")  # at the other warm-up lengths
ABLATION_METRICS = (("domain_loss", "domain loss", 3), ("chrf", "chrF", 2), ("bleu", "BLEU", 2),
                    ("rougeL", "ROUGE-L", 2), ("meteor", "METEOR", 2), ("forgetting", "forgetting", 4),
                    ("noisy_share", "noisy share", 3))


def metric(row: dict, key: str) -> float | None:
    """A run's figure: after fine-tuning, or the run's own (forgetting, noisy share)."""
    value = row.get(key) if key in ("forgetting", "noisy_share") else (row.get("after") or {}).get(key)
    return None if value is None or (isinstance(value, float) and math.isnan(value)) else float(value)


def paired_deltas(rows: list[dict], reference, key: str,
                  match: tuple[str, ...] = ("warmup", "budget", "view")) -> dict[tuple, tuple[float, float, int]]:
    """For each (warm-up, budget, view, strategy) of a row that is not a reference row
    (``reference(row)`` true): the mean and sample sd over seeds of the paired difference
    metric(row) - metric(reference row), the reference row being the one of the same seed that agrees
    on the ``match`` fields, and how many seeds paired. Pairing removes what a seed shares (warm-up,
    fine-tune order) from the spread. Random does not depend on the warm-up (the fine-tune starts
    from the base model): against it, ``match=("budget", "view")``."""
    def where(r: dict) -> tuple:
        return (*(r.get(f) for f in match), r["seed"])

    ref = {where(r): metric(r, key) for r in rows if reference(r)}
    diffs: dict[tuple, list[float]] = {}
    for r in rows:
        if reference(r):
            continue
        a, b = metric(r, key), ref.get(where(r))
        if a is not None and b is not None:
            diffs.setdefault(group(r), []).append(a - b)
    return {k: (*_ms(v), len(v)) for k, v in diffs.items()}


def group(r: dict) -> tuple:
    """A run's place in the ablation's tables: (warm-up, budget, view, strategy)."""
    return r["warmup"], r.get("budget", ""), r.get("view", "epochs"), r["strategy"]


def is_random(r: dict) -> bool:
    return r["method"] == "random"


def is_core(r: dict) -> bool:
    return r.get("variant") == "core"


def ablation_tables(rows: list[dict]) -> dict[str, str]:
    """The report's markdown tables: every run's means; what each switch adds to the core (paired
    over seeds, same warm-up, budget and view); every strategy against random (same budget and view)."""
    out = {}
    head = "| warm-up | budget | view | strategy | "
    lines = [head + " | ".join(m[1] for m in ABLATION_METRICS) + " |", "| --- | --- | --- | --- |"
             + " --- |" * len(ABLATION_METRICS)]
    for g in dict.fromkeys(group(r) for r in rows):
        rs = [r for r in rows if group(r) == g]
        cells = [_fmt(_ms([metric(r, k) for r in rs]), d) for k, _, d in ABLATION_METRICS]
        lines.append(f"| {g[0]:.0%} | {g[1]} | {g[2]} | {g[3]} | " + " | ".join(cells) + " |")
    out["runs"] = "\n".join(lines)

    def delta_table(reference, match, which) -> str:
        cols = [m for m in ABLATION_METRICS if m[0] != "bleu"]
        lines = [head + " | ".join(f"Δ {m[1]}" for m in cols) + " |", "| --- | --- | --- | --- |" + " --- |" * len(cols)]
        deltas = {k: paired_deltas(rows, reference, k, match) for k, _, _ in cols}
        for g in dict.fromkeys(group(r) for r in rows if not reference(r) and which(r)):
            cells = []
            for k, _, d in cols:
                m, sd, n = deltas[k].get(g, (math.nan, math.nan, 0))
                cells.append("–" if math.isnan(m) else f"{m:+.{d}f} ± {sd:.{d}f}")
            lines.append(f"| {g[0]:.0%} | {g[1]} | {g[2]} | {g[3]} | " + " | ".join(cells) + " |")
        return "\n".join(lines)

    if any(map(is_core, rows)):
        out["versus_core"] = delta_table(is_core, ("warmup", "budget", "view"), lambda r: r["method"] == "grads")
    if any(map(is_random, rows)):
        out["versus_random"] = delta_table(is_random, ("budget", "view"), lambda r: True)
    return out


LARGER_BUDGET_VARIANTS = ("all", "core", "core+diversity", "core+redundancy", "all-diversity",
                          "all-diversity-clusters")  # and random, both views


def ablation_strategies(budget: str, first: bool, larger: bool = False) -> list[str]:
    """The runs of one compare: at the first budget, random and every variant at the ``--full-at``
    warm-up and fewer at the others (random does not depend on the warm-up: the fine-tune starts
    from the base model); at a larger budget, random and the variants that moved something at the first."""
    variants = LARGER_BUDGET_VARIANTS if larger else ABLATION_VARIANTS if first else WARMUP_VARIANTS
    return ([f"random:{budget}%"] if first or larger else []) + [f"grads:{v}:{budget}%" for v in variants]


def run_ablation(a, work: Path, data: dict, base: dict, scale_name: str, seeds: list[int], budgets: list[str],
                 warmups: list[float], use_gpu: bool) -> None:
    """The ablation's runs, then its report. The first budget at every warm-up length
    (``work/ablation-wNN``, 2 epochs: at the smallest budget both views are the same runs); each larger
    budget at the ``--full-at`` warm-up in both views (``work/ablation-wNN-bBB-<view>``, its shared
    stages linked from the first budget's), the steps view taking the first budget's optimizer steps."""
    from grads_ray.compare import run_compare

    noisy = set(json.loads(Path(data["noise"]).read_text()))
    scale = SCALES[scale_name]
    rows: list[dict] = []
    first_budget, larger = budgets[0], budgets[1:]
    for f in warmups:
        folder = f"ablation-w{round(100 * f)}"
        first = math.isclose(f, a.full_at)
        if a.larger_only and not (first and larger):
            continue
        if not a.larger_only:
            cfg = compare_config(work, data, base, scale, "epochs", ablation_strategies(first_budget, first), seeds,
                                 None, use_gpu, warmup=f, folder=folder)
            rows += [{**r, "warmup": f, "view": "epochs"} for r in collect(work / folder, run_compare(cfg), noisy)]
            print(f"warm-up {f:.0%} done", flush=True)
        if not (first and larger):
            continue
        done = [r["finetune_steps"] for r in rows if r["budget"] == f"{first_budget}%" and r.get("finetune_steps")]
        steps = max(done) if done else max(1, math.ceil(float(first_budget) / 100 * data["domain_train"] / 16) * 2)
        for budget in larger:
            for view in ("epochs", "steps"):
                sub = f"{folder}-b{budget}-{view}"
                share_upstream(work / folder, work / sub, seeds)
                cfg = compare_config(work, data, base, scale, view, ablation_strategies(budget, False, larger=True),
                                     seeds, steps, use_gpu, warmup=f, folder=sub)
                rows += [{**r, "warmup": f, "view": view} for r in collect(work / sub, run_compare(cfg), noisy)]
                print(f"budget {budget}% {view} view done", flush=True)
    if a.worker:
        return
    tables = ablation_tables(rows)
    label = a.label or f"ablation-{scale_name}-{time.strftime('%Y-%m-%d')}"
    warm_steps = {f: _ms([(r.get("warmup_steps")) for r in rows if r["warmup"] == f]) for f in warmups}
    tune_steps = {g[1:3]: _ms([r.get("finetune_steps") for r in rows if group(r)[1:3] == g[1:3]])
                  for g in dict.fromkeys(group(r) for r in rows)}
    meta = {"label": label, "date": time.strftime("%Y-%m-%d"), "seeds": seeds, "budgets": budgets, "warmups": warmups,
            "data": data, "base": base, "warmup_steps": warm_steps}
    (work / f"{label}.json").write_text(json.dumps({"meta": meta, "runs": rows}, indent=1, default=str))
    doc = Path(a.doc) if a.doc else work
    doc.mkdir(parents=True, exist_ok=True)
    lines = [f"# Ablation `{label}`", "",
             f"{meta['date']}; seeds {seeds}; {data['domain_train']} training pairs "
             f"({data['noisy']['swapped'] + data['noisy']['truncated']} planted noisy). Budget {first_budget}%: warm-up "
             + ", ".join(f"{f:.0%}" for f in warmups) + f" of one epoch (random and every variant at "
             f"{a.full_at:.0%}; {', '.join(WARMUP_VARIANTS)} at the others), 2 epochs over each subset (at the "
             "smallest budget both views are the same runs)."
             + (f" Budgets {', '.join(b + '%' for b in larger)}: random and {', '.join(LARGER_BUDGET_VARIANTS)} at "
                f"{a.full_at:.0%} warm-up, in both views (epochs: 2 epochs over each subset; steps: the "
                f"{first_budget}% runs' optimizer steps, the subset cycled)." if larger else "")
             + " Mean ± sample sd over seeds; Δ: paired over seeds (same seed, warm-up, budget and view; against "
             "random, same seed, budget and view: random does not depend on the warm-up, the fine-tune starts from "
             "the base model).", "",
             "Warm-up optimizer steps (batch 16): " + ", ".join(
                 f"{f:.0%}: {m:.0f}" for f, (m, _) in warm_steps.items() if not math.isnan(m)) + ". Fine-tune steps: "
             + ", ".join(f"{b} {v}: {m:.0f}" for (b, v), (m, _) in tune_steps.items() if not math.isnan(m)) + ".", "",
             "## Every run", "", tables["runs"], ""]
    if "versus_core" in tables:
        lines += ["## What each switch adds to GrADS's core (Δ = variant − core)", "", tables["versus_core"], ""]
    if "versus_random" in tables:
        lines += ["## Against random at the same budget (Δ = strategy − random)", "", tables["versus_random"], ""]
    (doc / f"{label}.md").write_text("\n".join(lines))
    print(f"\nreport: {doc / (label + '.md')}")
    print(tables["runs"])
    head = {}
    for k in ("domain_loss", "chrf", "noisy_share"):
        for (f, _b, view, lab), (m, *_) in paired_deltas(rows, is_random, k, ("budget", "view")).items():
            head[f"{lab}_w{round(100 * f)}{'' if view == 'epochs' else '_' + view}_vs_random_{k}"] = round(m, 4)
    print(json.dumps({"label": label, **head}))


class Clock:
    """Wall time of the whole experiment across resumed invocations (gaps between them excluded): the
    total so far is kept in ``path``, rewritten every 30 s, so a killed invocation loses at most that."""

    def __init__(self, path: Path):
        import threading

        self.path, self.start = path, time.time()
        self.before = json.loads(path.read_text())["seconds"] if path.exists() else 0.0
        threading.Thread(target=self._tick, daemon=True).start()

    def seconds(self) -> float:
        total = self.before + time.time() - self.start
        self.path.write_text(json.dumps({"seconds": round(total, 1)}))
        return total

    def _tick(self) -> None:
        while True:
            time.sleep(30)
            self.seconds()


def token_strategies(a, methods: list[str]) -> list[str]:
    """``--token-budgets``' strategies: each method at each number of tokens (e.g. ``grads:34000tok``)."""
    return [f"{m}:{int(n)}tok" for n in (a.token_budgets or "").split(",") if n.strip() for m in methods]


def run_workers(a, scale: str, seeds: list[int], budgets: list[str], methods: list[str], views: list[str]) -> None:
    """Each seed's runs in its own ``--worker`` process (own local Ray), ``a.jobs`` at a time. Their
    stages are then found finished by the gathering pass."""
    import subprocess

    argv = [f"--scale={scale}", f"--budgets={','.join(budgets)}", f"--methods={','.join(methods)}",
            f"--views={','.join(views)}", f"--work={a.work}", f"--domain={a.domain}",
            f"--token-budgets={a.token_budgets or ''}"]
    pending, running = list(seeds), []
    logs = work_folder(a, scale) / "logs"
    logs.mkdir(parents=True, exist_ok=True)
    while pending or running:
        while pending and len(running) < a.jobs:
            seed = pending.pop(0)
            cmd = [sys.executable, __file__, *argv, f"--seeds={seed}", "--worker"]
            log = open(logs / f"seed-{seed}.log", "w")
            running.append((seed, subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT), log))
            print(f"seed {seed}: worker started (log {logs / f'seed-{seed}.log'})", flush=True)
        time.sleep(5)
        for item in list(running):
            seed, proc, log = item
            if proc.poll() is not None:
                log.close()
                running.remove(item)
                if proc.returncode != 0:
                    raise SystemExit(f"seed {seed}: worker failed ({proc.returncode}); see {logs / f'seed-{seed}.log'}")
                print(f"seed {seed}: worker done", flush=True)


def default_scale(quick: bool, domain: str, gpu: bool) -> str:
    """quick with --quick; else gpu where CUDA is; else cpu (docs domain) or code (code domain)."""
    return "quick" if quick else "gpu" if gpu else "code" if domain == "code" else "cpu"


def work_folder(a, scale_name: str) -> Path:
    """``--work``/<scale> for the docs domain, ``--work``/<scale>-code for the code domain (the code
    scale's own folder is ``code``)."""
    code = a.domain == "code" and scale_name != "code"
    return Path(a.work).resolve() / (scale_name + ("-code" if code else ""))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="a few CPU minutes: 1 seed, 5%%, 4 strategies, epochs view")
    ap.add_argument("--scale", choices=sorted(SCALES), default=None, help="default: quick with --quick, gpu where CUDA is, else cpu (code with --domain code)")
    ap.add_argument("--seeds", default=None, help="comma-separated (default 0,1,2; quick: 0)")
    ap.add_argument("--budgets", default=None, help="percent, comma-separated (default 5,10,50; quick: 5)")
    ap.add_argument("--methods", default=None, help=f"default {','.join(METHODS)} (quick: random,grads,fisher)")
    ap.add_argument("--views", default=None, help="epochs,steps (quick: epochs); tokens with --token-budgets")
    ap.add_argument("--work", default="runs/evidence", help="working folder (kept: a rerun resumes)")
    ap.add_argument("--doc", default=None, help="folder for <label>.md and the plots (e.g. docs/evidence)")
    ap.add_argument("--label", default=None, help="the run's name in the doc (default: scale-date)")
    ap.add_argument("--jobs", type=int, default=1,
                    help="seeds run at once, each in its own process and local Ray (stage times then include the "
                         "contention between them)")
    ap.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)  # one seed's runs, no report
    ap.add_argument("--report-only", action="store_true", help="redraw the report from the work folder's evidence.json")
    ap.add_argument("--domain", choices=("docs", "code"), default="docs",
                    help="docs: docstring/reference pairs; code: the library's functions and classes as "
                         "instruction -> code (work folder <scale>-code, or code at the code scale)")
    ap.add_argument("--token-budgets", default=None,
                    help="comma-separated token counts (e.g. 34000,340000) for the view tokens (--views "
                         "epochs,tokens): every method trains on the same number of tokens (the epochs view's recipe), "
                         "since selections of the same number of pairs can differ in length")
    ap.add_argument("--ablation", action="store_true",
                    help="issue 22's ablation instead: GrADS's core and each addition alone at several warm-up lengths "
                         "(--budgets' first, default 5), and the main parts at the larger budgets in both views "
                         "(default 5,50)")
    ap.add_argument("--warmups", default="0.1,0.5,1.0", help="ablation: warm-up fractions of one epoch")
    ap.add_argument("--larger-only", action="store_true", help="ablation: only the budgets after the first")
    ap.add_argument("--full-at", type=float, default=0.1,
                    help="ablation: the warm-up fraction at which random and every variant run (the others: "
                         f"{', '.join(WARMUP_VARIANTS)})")
    a = ap.parse_args()
    if a.report_only:
        scale_name = a.scale or default_scale(a.quick, a.domain, False)
        saved = json.loads((work_folder(a, scale_name) / "evidence.json").read_text())
        meta, summaries = saved["meta"], saved["summary"]
        for summary in summaries.values():  # JSON gave lists for the (mean, sd) pairs
            for entry in summary:
                entry.update({k: tuple(v) for k, v in entry.items() if isinstance(v, list)})
        meta["stage_seconds"] = {k: tuple(v) for k, v in meta["stage_seconds"].items()}
        doc = Path(a.doc) if a.doc else work_folder(a, scale_name)
        write_report(doc / f"{meta['label']}.md", meta["label"], meta, summaries, plots(summaries, doc, meta["label"]))
        print(json.dumps({"label": meta["label"], "minutes": round(meta["seconds"] / 60, 1), **meta["headline"]}))
        return
    logging.basicConfig(level=logging.WARNING, format="%(message)s")
    logging.getLogger("grads_ray").setLevel(logging.INFO)

    import ray
    import torch

    from grads_ray.compare import run_compare

    scale_name = a.scale or default_scale(a.quick, a.domain, torch.cuda.is_available())
    scale = SCALES[scale_name]
    seeds = [int(x) for x in (a.seeds or ("0" if a.quick else "0,1,2")).split(",")]
    budgets = [x.strip() for x in (a.budgets or ("5" if a.quick else "5,50" if a.ablation else "5,10,50")).split(",")]
    methods = (a.methods or ("random,grads,fisher" if a.quick else ",".join(METHODS))).split(",")
    views = (a.views or ("epochs" if a.quick else "epochs,steps")).split(",")
    strategies = ["full"] + [f"{m}:{b}%" for b in budgets for m in methods]
    use_gpu = torch.cuda.is_available()
    work = work_folder(a, scale_name)
    work.mkdir(parents=True, exist_ok=True)
    clock = None if a.worker or a.ablation else Clock(work / "clock.json")  # the ablation's runs are timed per stage
    t0 = time.time()
    ray.init(address="local", include_dashboard=False, log_to_driver=False,
             runtime_env={"env_vars": {"HF_HUB_OFFLINE": "1", "TRANSFORMERS_VERBOSITY": "error",
                                       "TOKENIZERS_PARALLELISM": "false"}})
    ctx = ray.data.DataContext.get_current()
    ctx.enable_progress_bars = False
    ctx.execution_options.preserve_order = True

    data = build_data(work, scale, domain=a.domain)
    print(f"data: {json.dumps({k: v for k, v in data.items() if not isinstance(v, str)})}", flush=True)
    base = pretrain(work, data, scale, use_gpu)
    print(f"base model: {json.dumps(base)}", flush=True)
    if a.ablation:
        if not any(math.isclose(float(x), a.full_at) for x in a.warmups.split(",")) and not a.worker:
            raise SystemExit(f"--full-at {a.full_at} is not among --warmups {a.warmups}")
        run_ablation(a, work, data, base, scale_name, seeds, budgets, [float(x) for x in a.warmups.split(",")],
                     use_gpu)
        ray.shutdown()
        return
    noisy = set(json.loads(Path(data["noise"]).read_text()))
    if a.jobs > 1 and not a.worker and len(seeds) > 1:
        run_workers(a, scale_name, seeds, budgets, methods, views)  # the seeds' runs, a.jobs at a time; the pass below then only gathers them
    smallest = min(budgets, key=float)
    steps = None
    results: dict[str, list[dict]] = {}
    for view in views:
        runs = strategies
        if view == "tokens":  # the epochs view's recipe, with budgets in tokens and no full-corpus run
            if not token_strategies(a, methods):
                raise SystemExit("--views tokens needs --token-budgets")
            cfg = compare_config(work, data, base, scale, "epochs", token_strategies(a, methods), seeds, None,
                                 use_gpu, folder="compare-tokens")
            if view != views[0]:
                share_upstream(work / f"compare-{views[0]}", work / "compare-tokens", seeds)
            results[view] = collect(work / "compare-tokens", run_compare(cfg), noisy)
            print(f"{view} view done ({(time.time() - t0) / 60:.1f} min)", flush=True)
            continue
        if view != "epochs":
            # the same optimizer steps for every run: those of the smallest budget in the epochs view, whose
            # runs then serve both views unchanged (without the epochs view: the same count, computed)
            steps = steps or max(1, math.ceil(float(smallest) / 100 * data["domain_train"] / 16) * 2)
            if "epochs" in results:
                runs = [s for s in strategies if not s.endswith(f":{smallest}%")]
        cfg = compare_config(work, data, base, scale, view, runs, seeds, steps, use_gpu)
        if view != views[0]:
            share_upstream(work / f"compare-{views[0]}", work / f"compare-{view}", seeds)
        result = run_compare(cfg)
        results[view] = collect(work / f"compare-{view}", result, noisy)
        if view == "epochs":
            steps = max(r["finetune_steps"] for r in results[view] if r["budget"] == f"{smallest}%")
        elif "epochs" in results:
            results[view] += [{**r, "reused": "epochs"} for r in results["epochs"] if r["budget"] == f"{smallest}%"]
        print(f"{view} view done ({(time.time() - t0) / 60:.1f} min)", flush=True)
    ray.shutdown()
    if a.worker:
        return

    summaries = {view: summarize(rows) for view, rows in results.items()}
    for view, summary in summaries.items():
        print(f"\n{view} view\n{table(summary)}")
    label = a.label or f"{scale_name}-{time.strftime('%Y-%m-%d')}"
    machine = (f"{torch.cuda.get_device_name(0)}, " if use_gpu else "") + f"{platform.machine()} CPU, " \
              f"{__import__('os').cpu_count()} cores"
    per_stage: dict[str, list[float]] = {}
    for seed in seeds:  # the shared stages, once per seed (the other views link the first's)
        for stage, sec in stage_seconds(manifest_stages(work / f"compare-{views[0]}" / f"seed-{seed}")).items():
            per_stage.setdefault(stage, []).append(sec)
    for rows in results.values():
        for r in rows:
            if not r.get("reused"):
                for stage, sec in r["seconds"].items():
                    per_stage.setdefault(stage, []).append(sec)
    meta = {"label": label, "stage_seconds": {k: _ms(v) for k, v in per_stage.items()}, "date": time.strftime("%Y-%m-%d"), "machine": machine, "seconds": clock.seconds(),
            "data": data, "base": base, "seeds": seeds, "jobs": min(a.jobs, len(seeds)), "steps": steps, "headline": headline(summaries)}
    (work / "evidence.json").write_text(json.dumps({"meta": meta, "runs": results, "summary": summaries},
                                                   indent=1, default=str))
    doc = Path(a.doc) if a.doc else work
    doc.mkdir(parents=True, exist_ok=True)
    pngs = plots(summaries, doc, label)
    write_report(doc / f"{label}.md", label, meta, summaries, pngs)
    print(f"\nreport: {doc / (label + '.md')}")
    print(json.dumps({"label": label, "minutes": round(meta["seconds"] / 60, 1), **meta["headline"]}))


if __name__ == "__main__":
    main()
