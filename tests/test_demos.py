"""Every demo of this folder runs with --smoke and writes what it says, with sensible values."""

from __future__ import annotations

import json
import runpy
from pathlib import Path

DEMOS = Path(__file__).resolve().parents[1] / "demos"


def run_demo(name: str, *argv: str) -> None:
    runpy.run_path(str(DEMOS / f"{name}.py"))["main"](["--smoke", *argv])


def test_attach_timm(tmp_path, capsys):
    run_demo("attach_timm", "--out", str(tmp_path), "--standard-vit")
    result = json.loads((tmp_path / "budgets.json").read_text())
    rows = result["canvas_vit"]["rows"]
    assert [row["budget"] for row in rows] == [1.0, 0.5, 0.25, 0.125]
    assert rows[0]["agreement"] == 100.0 and rows[0]["accuracy"] == rows[0]["full_token_accuracy"]
    assert rows[0]["full_token_accuracy"] > 80  # the committed canvas ViT on cluttered test canvases
    assert rows[-1]["box_coverage"] < rows[0]["box_coverage"]
    speed = result["vit_tiny_patch16_224"]["rows"]
    assert all(row["speedup"] > 0 for row in speed) and speed[-1]["ms"] < speed[0]["ms"]  # 12.5% vs. every token
    assert (tmp_path / "budgets.png").stat().st_size > 0
    assert str(tmp_path / "budgets.json") in capsys.readouterr().out


def test_attach_transformers(tmp_path):
    run_demo("attach_transformers", "--out", str(tmp_path))
    result = json.loads((tmp_path / "budgets.json").read_text())
    assert result["budget_1_identical"] is True
    rows = result["rows"]
    assert rows[0]["agreement"] == 100.0 and all(0 <= row["agreement"] <= 100 for row in rows)
    assert all(row["speedup"] > 0 for row in rows)
    assert (tmp_path / "budgets.png").stat().st_size > 0


def test_online_adaptation(tmp_path):
    run_demo("online_adaptation", "--out", str(tmp_path))
    result = json.loads((tmp_path / "adaptation.json").read_text())
    log = result["log"]
    assert log["images"] == [32, 64] and len(log["frozen_accuracy"]) == len(log["adapting_accuracy"]) == 2
    assert all(0 <= a <= 100 for a in log["frozen_accuracy"] + log["adapting_accuracy"])
    assert 0 <= result["summary"]["running_agreement"] <= 1
    assert (tmp_path / "adaptation.png").stat().st_size > 0


def test_ablate_rules(tmp_path):
    run_demo("ablate_rules", "--out", str(tmp_path), "--override", "rules.allocator={name: frozen}")
    rows = json.loads((tmp_path / "ablation.json").read_text())["rows"]
    assert [row["rules"] for row in rows] == ["default", "rules.allocator={'name': 'frozen'}"]
    assert all(0 <= row["accuracy"] <= 100 and row["step_ms"] > 0 for row in rows)
    assert (tmp_path / "ablation.png").stat().st_size > 0
