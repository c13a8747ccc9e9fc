"""The demo's assets: a base model pre-trained on general prose (so the demo's forgetting and
generation lines compare a model that knew something), a forgetting test from other pages, built
once and kept."""

from __future__ import annotations

import json

from grads_ray import cli


def test_the_demo_base_model_is_pretrained_once_on_other_pages_than_its_forgetting_test(tmp_path, monkeypatch,
                                                                                       capsys):
    monkeypatch.setattr(cli, "DEMO_PRETRAIN_CHARS", 150_000)  # the shipped sizes take a minute or two
    monkeypatch.setattr(cli, "DEMO_PRETRAIN_TOKENS", 16 * 128 * 12)
    out = tmp_path / "demo"
    assert cli.main(["demo", "--output", str(out), "--dry-run"]) == 0  # builds the assets, then plans
    assets = out / "assets"
    info = json.loads((assets / "model" / "demo_base.json").read_text())
    pt = info["pretrain"]
    assert pt["steps"] == 12 and pt["last_loss"] < pt["first_loss"] - 0.5  # it learned something
    pretrain, general = (assets / "pretrain.txt").read_text(), (assets / "general.txt").read_text()
    assert len(pretrain) >= 150_000 and len(general) > 10_000
    pages = [p for p in general.split("\n\n") if len(p) > 200][:50]
    assert pages and not any(p in pretrain for p in pages)  # forgetting is measured on unseen pages
    assert not (assets / ".model.tmp").exists()
    stamp = (assets / "model" / "model.safetensors").stat().st_mtime_ns
    capsys.readouterr()
    assert cli.main(["demo", "--output", str(out), "--dry-run"]) == 0
    assert (assets / "model" / "model.safetensors").stat().st_mtime_ns == stamp  # built once
    assert "building" not in capsys.readouterr().out
