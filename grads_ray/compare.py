"""``grads-ray compare``: several selection strategies at several budgets, from one base model and
seed, each fine-tuned and evaluated; a report of how much each taught and how much it cost.

Layout: ``OUT/seed-S/`` is a whole run up to the shared stages (ingest, warm-up, score, similarity,
embed, and the base model's evaluation, computed for the first seed and linked into the others); each strategy gets ``OUT/seed-S/LABEL/``, whose shared stages are hard links to the seed's (server-side copies in an object store)
(their fingerprints match, so nothing is recomputed), and runs select, fine-tune and evaluate there.
Then ``OUT/comparison.json`` (every run, and mean ± sample standard deviation over seeds),
``OUT/report.md`` and two plots: the domain loss after fine-tuning, and the forgetting, against
the share of the corpus selected.

A strategy is ``METHOD:BUDGET`` (``grads:5%``, ``random:500``, ``fisher:20000 tokens``),
``METHOD:VARIANT:BUDGET`` (``grads:core:5%``, ``grads:core+dedup:5%``, ``grads:all-clusters:5%``: named
switches, grads_ray/selection/variants.py, and the user's ``compare.variants``) or ``full`` (every
scored row). Each run's variant settings go into comparison.json and the report.
"""

from __future__ import annotations

import copy
import math
import statistics
from typing import Any

from grads_ray import storage
from grads_ray.config import Config, ConfigError, validate, with_settings
from grads_ray.rundir import write_json, write_text
from grads_ray.selection.variants import check_user_variants, variant_settings
from grads_ray.stages import STAGES, Stage, closure, job_end, per_strategy

METRICS = ("domain_loss", "general_loss", "bleu", "chrf", "rougeL", "meteor")


def parse_strategy(text: str) -> tuple[str, str, str, str]:
    """-> (label for folders and the report, method, variant ("" for none), budget)."""
    text = text.strip()
    if text == "full":
        return "full", "random", "", "100%"
    parts = [p.strip() for p in text.split(":")]
    if len(parts) not in (2, 3) or not all(parts):
        raise ConfigError(f"compare.strategies: {text!r} is not METHOD:BUDGET (e.g. grads:5%), "
                          "METHOD:VARIANT:BUDGET (e.g. grads:core:5%) or full")
    method, variant, budget = parts[0], parts[1] if len(parts) == 3 else "", parts[-1]
    label = "-".join(x for x in (method, variant, budget.replace(" ", "").replace("%", "pct")) if x)
    return label, method, variant, budget


def shared_stages(cfg: Config) -> list[Stage]:
    """The stages a run of ``cfg`` takes whose results no selection changes (grads_ray/stages/):
    computed once per seed and linked into each strategy's folder."""
    per = per_strategy(cfg)
    return [s for s in closure(cfg, job_end(cfg)) if s.name not in per]


def shared_folders(cfg: Config) -> list[str]:
    """The output folders of every stage whose result no selection changes, whatever the method."""
    per = per_strategy(cfg)
    return [f for s in STAGES if s.name not in per for f in s.folders]


def strategy_settings(base_cfg: Config, method: str, variant: str) -> dict[str, Any]:
    """The select-stage overrides a strategy's variant stands for ({} without one); a ConfigError
    names the strategy."""
    if not variant:
        return {}
    try:
        settings = variant_settings(method, variant, base_cfg.select, base_cfg.compare.variants)
    except ConfigError as exc:
        raise ConfigError(f"compare.strategies: {method}:{variant}: {exc}") from None
    if settings.get("select.grads.cluster_alpha", -1.0) >= 0 and base_cfg.similarity.clusters == 0:
        raise ConfigError(f"compare.strategies: {method}:{variant} turns the cluster quotas on, but "
                          "similarity.clusters=0 computes no clusters")
    return settings


def strategy_config(base_cfg: Config, label: str, method: str, budget: str, variant: str = "") -> Config:
    """The seed's config with the strategy's method, budget and variant, in its own folder."""
    sub = copy.deepcopy(base_cfg)
    sub.output = str(storage.location(base_cfg.output) / label)
    sub.select.method, sub.select.budget = method, budget
    if label == "full":
        sub.select.dedup = "false"
    settings = strategy_settings(base_cfg, method, variant)
    if settings:
        try:
            sub = with_settings(sub, settings)
        except ConfigError as exc:
            raise ConfigError(f"compare.strategies: {method}:{variant}: {exc}") from None
    validate(sub)
    return sub


def run_compare(cfg: Config, verbose: bool = False) -> dict[str, Any]:
    """Run every strategy for every seed; write comparison.json, report.md and the plots."""
    from grads_ray.runner import Runner

    strategies = [parse_strategy(s) for s in cfg.compare.strategies]
    labels = [s[0] for s in strategies]
    if len(set(labels)) != len(labels):
        raise ConfigError(f"compare.strategies: two strategies share a label: {labels}")
    check_user_variants(cfg.compare.variants, cfg)  # every one, used or not, before anything runs
    settings = {label: strategy_settings(cfg, method, variant) for label, method, variant, _ in strategies}
    out = storage.location(cfg.output)
    rows = []
    seeds = list(cfg.compare.seeds) or [cfg.seed]
    for seed in seeds:
        base_cfg = copy.deepcopy(cfg)
        base_cfg.seed, base_cfg.output = seed, str(out / f"seed-{seed}")
        subs = [(label, method, variant, budget, strategy_config(base_cfg, label, method, budget, variant))
                for label, method, variant, budget in strategies]
        base = Runner(base_cfg, verbose=verbose)
        first = out / f"seed-{seeds[0]}" / "baseline"  # the base model's evaluation: seed-independent
        if seed != seeds[0] and first.exists() and not (base.run_dir / "baseline").exists():
            storage.copy_tree(first, base.run_dir / "baseline")
        shared = {s.name for *_, sub in subs for s in shared_stages(sub)}
        for stage in STAGES:  # every stage some strategy needs and no selection changes, once a seed
            if stage.name in shared:
                base.run(stage.name)
        for label, method, variant, budget, sub_cfg in subs:
            sub_out = storage.location(sub_cfg.output)
            storage.makedirs(sub_out)
            for stage in shared_stages(sub_cfg):  # its folders and its top-level files (rejected.jsonl)
                for folder in stage.folders:
                    if not (sub_out / folder).exists():  # hard links (or server-side copies): no bytes copied here
                        storage.copy_tree(base.run_dir / folder, sub_out / folder)
                for name in stage.files:
                    if not (sub_out / name).exists() and (base.run_dir / name).exists():
                        storage.link_or_copy(base.run_dir / name, sub_out / name)
            run = Runner(sub_cfg, verbose=verbose)
            ev = run.run().value if sub_cfg.finetune.enabled else {}
            sel = run.manifest["stages"]["select"]
            rows.append({"seed": seed, "strategy": label, "method": method, "variant": variant, "budget": budget,
                         "settings": settings[label],
                         "selected": sel["selected"], "scored": sel["scored"],
                         "selected_share": sel["selected"] / max(sel["scored"], 1),
                         "selected_tokens": sel["selected_tokens"], "total_tokens": sel["total_tokens"],
                         "before": ev.get("before", {}), "after": ev.get("after", {}),
                         "forgetting": ev.get("forgetting"),
                         "train_tokens_per_s": (run.manifest["stages"].get("finetune", {}).get("metrics") or {})
                         .get("tokens_per_s")})
    result = {"strategies": labels, "seeds": seeds, "settings": settings, "runs": rows, "summary": summarize(rows)}
    write_json(out / "comparison.json", result)
    plots = write_plots(result, out)
    write_text(out / "report.md", report_markdown(result, plots))
    return result


def _yaml(value: Any) -> str:
    """A setting as it would be written in an override."""
    import json

    return json.dumps(value) if isinstance(value, (list, dict)) else str(value)


def _mean_sd(values: list[float]) -> tuple[float, float]:
    values = [v for v in values if v is not None and not math.isnan(v)]
    if not values:
        return math.nan, math.nan
    return statistics.fmean(values), statistics.stdev(values) if len(values) > 1 else 0.0


def summarize(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Per strategy, over seeds: mean and sample standard deviation of each metric after fine-tuning,
    of the forgetting and of the selected share."""
    out = []
    for label in dict.fromkeys(r["strategy"] for r in rows):
        mine = [r for r in rows if r["strategy"] == label]
        entry: dict[str, Any] = {"strategy": label, "method": mine[0]["method"], "budget": mine[0]["budget"],
                                 "variant": mine[0].get("variant", ""), "seeds": len(mine)}
        entry["selected_share"], _ = _mean_sd([r["selected_share"] for r in mine])
        for key in METRICS:
            entry[f"{key}_after"] = _mean_sd([r["after"].get(key, math.nan) for r in mine])
            entry[f"{key}_before"] = _mean_sd([r["before"].get(key, math.nan) for r in mine])
        entry["forgetting"] = _mean_sd([r["forgetting"] if r["forgetting"] is not None else math.nan for r in mine])
        out.append(entry)
    return out


def _series(entry: dict[str, Any]) -> str:
    """A plot's series: the method, with its variant where it has one (grads:core)."""
    return entry["method"] + (f":{entry['variant']}" if entry.get("variant") else "")


def write_plots(result: dict[str, Any], out: storage.Location) -> list[str]:
    """Domain loss after fine-tuning and forgetting against the selected share, one series per
    method and variant (error bars: the spread over seeds). -> the PNG file names written."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = []
    for key, ylabel, fname in (("domain_loss_after", "held-out domain loss after fine-tuning", "domain_vs_budget.png"),
                               ("forgetting", "forgetting (relative change of general loss)",
                                "forgetting_vs_budget.png")):
        fig, ax = plt.subplots(figsize=(6, 4), dpi=100)
        for series in dict.fromkeys(_series(s) for s in result["summary"]):
            pts = sorted((s["selected_share"], *s[key]) for s in result["summary"] if _series(s) == series)
            pts = [p for p in pts if not math.isnan(p[1])]
            if pts:
                ax.errorbar([100 * p[0] for p in pts], [p[1] for p in pts], yerr=[p[2] for p in pts],
                            marker="o", capsize=3, label=series)
        ax.set_xlabel("selected share of the corpus (%)")
        ax.set_ylabel(ylabel)
        ax.grid(alpha=0.3)
        ax.legend()
        fig.tight_layout()
        storage.atomic_write(out / fname, lambda fh: fig.savefig(fh, format="png"))  # noqa: B023
        plt.close(fig)
        names.append(fname)
    return names


def report_markdown(result: dict[str, Any], plots: list[str]) -> str:
    """The human report: one row per strategy, mean ± sd over seeds."""

    def ms(pair: tuple[float, float], digits: int = 4) -> str:
        m, s = pair
        if math.isnan(m):
            return "–"
        return f"{m:.{digits}f}" + (f" ± {s:.{digits}f}" if len(result["seeds"]) > 1 else "")

    lines = ["# grads-ray comparison", "",
             f"Seeds: {', '.join(map(str, result['seeds']))}. Mean ± sample standard deviation over seeds. "
             "Domain loss: held-out response tokens (lower = learned more). Forgetting: relative change of "
             "the general-text loss after fine-tuning (higher = forgot more). BLEU, chrF, ROUGE-L, METEOR: greedy "
             "continuations of held-out prompts (0–100; METEOR – where no WordNet was found).", "",
             "| strategy | selected | domain loss before | domain loss after | forgetting | BLEU | chrF | ROUGE-L | METEOR |",
             "| --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    for s in result["summary"]:
        lines.append(f"| {s['strategy']} | {100 * s['selected_share']:.1f}% | {ms(s['domain_loss_before'])} | "
                     f"{ms(s['domain_loss_after'])} | {ms(s['forgetting'])} | {ms(s['bleu_after'], 2)} | "
                     f"{ms(s['chrf_after'], 2)} | {ms(s['rougeL_after'], 2)} | {ms(s['meteor_after'], 2)} |")
    variants = {k: v for k, v in result.get("settings", {}).items() if v}
    if variants:
        lines += ["", "Variants (select-stage settings on top of the config; grads_ray/selection/variants.py):", ""]
        lines += [f"- {label}: " + ", ".join(f"`{k}={_yaml(v)}`" for k, v in s.items()) for label, s in variants.items()]
    lines += ["", *[f"![{p}]({p})" for p in plots], "",
              "Every run's numbers: comparison.json; each run's folder: seed-S/STRATEGY/ (manifest.json, eval.json).", ""]
    return "\n".join(lines)
