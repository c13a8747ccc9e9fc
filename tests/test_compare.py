"""grads-ray compare's arithmetic and report, without Ray (the end-to-end run is in test_pipeline)."""

from __future__ import annotations

import math

import pytest

from grads_ray.compare import parse_strategy, report_markdown, strategy_config, summarize, write_plots
from grads_ray.config import Config, ConfigError, GradsConfig, load_config, with_settings
from grads_ray.selection.variants import check_user_variants, variant_settings


def test_parse_strategy():
    assert parse_strategy("full") == ("full", "random", "", "100%")
    assert parse_strategy(" grads:5% ") == ("grads-5pct", "grads", "", "5%")
    assert parse_strategy("fisher:20000 tokens") == ("fisher-20000tokens", "fisher", "", "20000 tokens")
    assert parse_strategy("grads:core+dedup:5%") == ("grads-core+dedup-5pct", "grads", "core+dedup", "5%")
    for bad in ("grads", "grads:", ":5%", "5%", "grads::5%", "grads:a:b:5%"):
        with pytest.raises(ConfigError):
            parse_strategy(bad)


def test_variants_switch_exactly_the_named_parts():
    sc = Config().select
    core = variant_settings("grads", "core", sc)
    cfg = with_settings(Config(), core)
    g = cfg.select.grads
    assert (g.direction, g.w_diversity, g.w_redundancy, g.cluster_alpha, cfg.select.dedup) == ("none", 0, 0, -1, "false")
    assert g.stats == GradsConfig().stats  # the signal is untouched
    full = with_settings(Config(), variant_settings("grads", "all", sc))
    d = GradsConfig()
    assert (full.select.grads.direction, full.select.grads.w_diversity, full.select.grads.w_redundancy,
            full.select.grads.cluster_alpha, full.select.dedup) == (d.direction, 0.5, d.w_redundancy, 0.5, "true")
    one = with_settings(Config(), variant_settings("grads", "core+dedup+norm", sc)).select
    assert one.dedup == "true" and one.grads.w_diversity == 0 and one.grads.stats == ["grad_norm"]
    minus = with_settings(Config(), variant_settings("grads", "all-clusters", sc)).select.grads
    assert minus.cluster_alpha == -1 and minus.w_diversity == 0.5 and minus.direction == "both"


def test_variants_keep_a_tuned_setting_and_clear_mappings():
    cfg = load_config(None, ["select.grads.w_diversity=0.2", "select.grads.directions={grad_norm: upper}",
                             "select.grads.cluster_alpha=-1"])
    on = with_settings(cfg, variant_settings("grads", "all", cfg.select)).select.grads
    assert on.w_diversity == 0.2 and on.directions == {"grad_norm": "upper"} and on.cluster_alpha == 0.5
    off = with_settings(cfg, variant_settings("grads", "core", cfg.select)).select.grads
    assert off.directions == {} and off.direction == "none"  # a cleared mapping, not merged with the old


def test_user_variants_and_errors():
    sc = Config().select
    user = {"k5": ["select.grads.k=5", "select.grads.region=hdr"]}
    s = variant_settings("grads", "core+k5", sc, user)
    cfg = with_settings(Config(), s)
    assert cfg.select.grads.k == "5" and cfg.select.grads.region == "hdr" and cfg.select.grads.w_diversity == 0
    assert variant_settings("fisher", "+dedup", sc) == {"select.dedup": "true"}
    assert variant_settings("grads", "k5", sc, user) == {"select.grads.k": 5, "select.grads.region": "hdr"}
    for method, bad in (("grads", "core+bogus"), ("grads", "dedup+core"), ("grads", "core dedup"),
                        ("grads", "core+-dedup"), ("fisher", "core"), ("fisher", "+norm"), ("random", "+clusters"),
                        ("grads", "-k5"), ("grads", "core+dedupdiversity")):
        with pytest.raises(ConfigError):
            variant_settings(method, bad, sc, user)
    with pytest.raises(ConfigError, match="select"):
        variant_settings("grads", "core+w", sc, {"w": ["warmup.fraction=1.0"]})
    with pytest.raises(ConfigError, match="must be one of"):  # a bad value is refused as an override would be
        with_settings(Config(), variant_settings("grads", "x", sc, {"x": ["select.grads.region=everywhere"]}))


def test_strategy_config_applies_the_variant(tmp_path):
    base = load_config(None, [f"output={tmp_path}", "compare.variants={nodiv: [select.grads.w_diversity=0]}"])
    sub = strategy_config(base, "grads-core-5pct", "grads", "5%", "core")
    assert sub.select.budget == "5%" and sub.select.grads.direction == "none"
    assert sub.output.endswith("grads-core-5pct")
    assert strategy_config(base, "g", "grads", "5%", "nodiv").select.grads.w_diversity == 0
    assert strategy_config(base, "g", "grads", "5%").select.grads.w_diversity == GradsConfig().w_diversity == 0


def _row(seed, strategy, method, share, dl, forget, bleu):
    return {"seed": seed, "strategy": strategy, "method": method, "budget": "x", "selected_share": share,
            "before": {"domain_loss": 8.0, "general_loss": 5.0}, "forgetting": forget,
            "after": {"domain_loss": dl, "general_loss": 5.0 * (1 + forget), "bleu": bleu, "chrf": 2 * bleu,
                      "rougeL": 3 * bleu}}


def test_summary_mean_and_sample_sd_over_seeds(tmp_path):
    rows = [_row(0, "grads-5pct", "grads", 0.05, 6.0, 0.01, 1.0), _row(1, "grads-5pct", "grads", 0.05, 6.2, 0.03, 3.0),
            _row(0, "random-5pct", "random", 0.05, 6.5, 0.02, 0.5), _row(1, "random-5pct", "random", 0.05, 6.7, 0.02, 0.5),
            _row(0, "full", "random", 1.0, 5.5, 0.10, 4.0), _row(1, "full", "random", 1.0, 5.5, 0.12, 4.0)]
    summary = summarize(rows)
    assert [s["strategy"] for s in summary] == ["grads-5pct", "random-5pct", "full"]
    g = summary[0]
    assert g["domain_loss_after"] == pytest.approx((6.1, math.sqrt(0.02)))  # sample sd of 6.0, 6.2
    assert g["bleu_after"] == pytest.approx((2.0, math.sqrt(2.0))) and g["seeds"] == 2
    assert g["forgetting"] == pytest.approx((0.02, math.sqrt(2e-4)))
    result = {"seeds": [0, 1], "summary": summary}
    plots = write_plots(result, tmp_path)
    for name in plots:
        assert (tmp_path / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    md = report_markdown(result, plots)
    assert "| grads-5pct | 5.0% | 8.0000 ± 0.0000 | 6.1000 ± 0.1414 | 0.0200 ± 0.0141 | 2.00 ± 1.41 |" in md
    assert "![domain_vs_budget.png](domain_vs_budget.png)" in md


def test_report_names_each_variants_settings():
    rows = [{**_row(0, "grads-core-5pct", "grads", 0.05, 6.0, 0.01, 1.0), "variant": "core"},
            _row(0, "grads-5pct", "grads", 0.05, 6.1, 0.01, 1.0)]
    summary = summarize(rows)
    assert [s["variant"] for s in summary] == ["core", ""]
    settings = {"grads-core-5pct": variant_settings("grads", "core", Config().select), "grads-5pct": {}}
    md = report_markdown({"seeds": [0], "summary": summary, "settings": settings}, [])
    assert "- grads-core-5pct: `select.grads.direction=none`, `select.grads.directions={}`" in md
    assert "- grads-5pct" not in md


def test_variant_settings_later_entries_win():
    """A switch after a user variant that set part of the same mapping replaces it whole."""
    sc = Config().select
    user = {"up": ["select.grads.directions.grad_norm=upper"]}
    off = with_settings(Config(), variant_settings("grads", "core+up-band", sc, user)).select.grads
    assert off.directions == {} and off.direction == "none"
    on = with_settings(Config(), variant_settings("grads", "core-band+up", sc, user)).select.grads
    assert on.directions == {"grad_norm": "upper"}


def test_core_turns_off_what_is_not_a_switch_and_all_keeps_it():
    cfg = load_config(None, ["select.grads.w_loss=0.3", "select.max_similarity=0.9", "select.grads.region=sparse"])
    core = with_settings(cfg, variant_settings("grads", "core", cfg.select)).select
    assert core.grads.w_loss == 0 and core.max_similarity == 0 and core.grads.region == "sparse"
    full = with_settings(cfg, variant_settings("grads", "all", cfg.select)).select
    assert full.grads.w_loss == 0.3 and full.max_similarity == 0.9


def test_a_section_given_whole_keeps_its_other_keys(tmp_path):
    cfg = load_config(None, ["select.grads.w_diversity=0.2", "select.grads.region=sparse"])
    s = variant_settings("grads", "k5", cfg.select, {"k5": ["select.grads={k: 5}"]})
    g = with_settings(cfg, s).select.grads
    assert (g.k, g.w_diversity, g.region) == ("5", 0.2, "sparse")
    rel = with_settings(cfg, {"eval.wordnet": "none", "select.less.target_paths": ["t.jsonl"]})
    assert rel.select.less.target_paths[0].startswith("/")  # paths made absolute, as load_config does


def test_user_variant_names_and_keys_are_checked(tmp_path):
    sc = Config().select
    for bad in ({"dedup": ["select.grads.k=5"]}, {"no-div": ["select.grads.w_diversity=0"]},
                {"t": ["select.less.target_paths=[x.jsonl]"]}):
        with pytest.raises(ConfigError, match="compare.variants"):
            variant_settings("grads", "core", sc, bad)
    base = load_config(None, [f"output={tmp_path}", "compare.variants={typo: [select.grads.nope=1]}"])
    with pytest.raises(ConfigError, match="compare.variants.typo: unknown config key"):
        check_user_variants(base.compare.variants, base)
    no_clusters = load_config(None, [f"output={tmp_path}", "similarity.clusters=0"])
    with pytest.raises(ConfigError, match="similarity.clusters=0"):
        strategy_config(no_clusters, "g", "grads", "5%", "core+clusters")
    assert strategy_config(no_clusters, "g", "grads", "5%", "core").select.grads.cluster_alpha == -1
    with pytest.raises(ConfigError, match="grads:core\\+bogus"):
        strategy_config(base, "g", "grads", "5%", "core+bogus")


def test_eval_wordnet_folder_is_checked_and_made_absolute(tmp_path, monkeypatch):
    with pytest.raises(ConfigError, match="eval.wordnet"):
        load_config(None, [f"eval.wordnet={tmp_path}"])
    (tmp_path / "wn").mkdir()
    (tmp_path / "wn" / "index.noun").write_text("")
    monkeypatch.chdir(tmp_path)
    assert load_config(None, ["eval.wordnet=wn"]).eval.wordnet == str(tmp_path / "wn")
