"""The ``arrcoc`` command line: every command's help, train -> eval -> adapt on tiny sizes, bad input."""

from __future__ import annotations

import json

import pytest

from arrcoc import ARRCOC
from arrcoc.cli import BENCHMARKS, main
from arrcoc.config import parse_override
from arrcoc.models.canvas_vit import load_canvas_vit

# visualize belongs to another module (arrcoc.visualize); its help is tested there
COMMANDS = ["train", "eval", "adapt", "sweep", "bench"]


@pytest.mark.parametrize("command", COMMANDS)
def test_help_of_every_command_mentions_config(command, capsys):
    with pytest.raises(SystemExit) as exit_:
        main([command, "--help"])
    assert exit_.value.code in (0, None)
    text = capsys.readouterr().out
    assert f"arrcoc {command}" in text and "--config" in text and "examples:" in text


@pytest.mark.parametrize("suite", sorted(BENCHMARKS))
def test_every_benchmark_suite_takes_a_config(suite, capsys):
    with pytest.raises(SystemExit) as exit_:
        main(["bench", suite, "--help"])
    assert exit_.value.code in (0, None)
    assert "--config" in capsys.readouterr().out


def test_top_level_help_lists_every_command(capsys):
    with pytest.raises(SystemExit):
        main(["--help"])
    text = capsys.readouterr().out
    assert all(command in text for command in [*COMMANDS, "visualize"])


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    out = tmp_path_factory.mktemp("cli") / "train"
    main(["train", "--out", str(out), "--canvases", "64", "--batch-size", "32", "--epochs", "1", "--test-images", "40",
          "--override", "target=box", "--budget", "0.25"])
    return out


def test_train_writes_a_loadable_checkpoint_and_metrics(checkpoint):
    metrics = json.loads((checkpoint / "metrics.json").read_text())
    assert metrics["task"] == "cluttered" and metrics["budget"] == 0.25 and metrics["steps_this_run"] == 2
    assert 0.5 < metrics["test_accuracy"]["all_tokens"] <= 1  # the committed canvas ViT, every token
    model = ARRCOC.from_pretrained(checkpoint, load_canvas_vit())
    assert model.config.target == "box" and model.config.budget == 0.25


def test_eval_reports_every_budget(checkpoint, tmp_path, capsys):
    main(["eval", "--checkpoint", str(checkpoint), "--budgets", "1.0", "0.25", "--test-images", "40",
          "--speed-images", "8", "--repeats", "1", "--out", str(tmp_path)])
    rows = json.loads((tmp_path / "eval.json").read_text())["rows"]
    assert [row["budget"] for row in rows] == [1.0, 0.25]
    full, reduced = rows
    assert full["accuracy"] == full["full_token_accuracy"] and full["agreement"] == 100.0  # budget 1: every token
    assert full["box_coverage"] == 100.0 and 0 < reduced["box_coverage"] < 100
    assert all(0 <= row["accuracy"] <= 100 and row["speedup"] > 0 for row in rows)
    assert (tmp_path / "eval.png").stat().st_size > 0
    out = capsys.readouterr().out
    assert "| budget |" in out and str(tmp_path / "eval.json") in out


def test_eval_takes_its_settings_from_config(checkpoint, tmp_path):
    settings = tmp_path / "eval.yaml"
    settings.write_text("budgets: [0.5]\ntest_images: 20\nspeed_images: 4\nrepeats: 1\n")
    main(["eval", "--checkpoint", str(checkpoint), "--config", str(settings), "--out", str(tmp_path)])
    result = json.loads((tmp_path / "eval.json").read_text())
    assert [row["budget"] for row in result["rows"]] == [0.5] and result["meta"]["test_images"] == 20


def test_adapt_logs_frozen_vs_adapting_and_saves_the_adapted_module(checkpoint, tmp_path):
    adapted = tmp_path / "adapted"
    main(["adapt", "--checkpoint", str(checkpoint), "--images", "64", "--probe-images", "16",
          "--out", str(tmp_path), "--save-adapted", str(adapted)])
    result = json.loads((tmp_path / "adapt.json").read_text())
    log, summary = result["log"], result["summary"]
    assert log["images"] == [32, 64] and summary["images"] == 64 and result["meta"]["split"] == "shift"
    assert all(0 <= a <= 100 for a in log["frozen_accuracy"] + log["adapting_accuracy"])
    assert all(p is not None for p in log["probe_agreement"])  # the probe judged every update
    assert summary["probe_rejections"] == sum(log["probe_rejected"])
    assert (tmp_path / "adapt.png").stat().st_size > 0
    ARRCOC.from_pretrained(adapted, load_canvas_vit())


def test_sweep_runs_a_grid(tmp_path):
    grid = tmp_path / "sweep.yaml"
    grid.write_text("task: toy-query\nbase: configs/arrcoc.yaml\n"
                    "grid:\n  rules.allocator: [{name: fa}, {name: frozen}]\n")
    main(["sweep", "--config", str(grid), "--quick", "--out", str(tmp_path)])
    rows = json.loads((tmp_path / "sweep.json").read_text())["rows"]
    assert [row["overrides"]["rules.allocator"]["name"] for row in rows] == ["fa", "frozen"]
    assert all(0 <= row["first_correct_mean"] <= 100 for row in rows)


@pytest.mark.parametrize("argv, message", [
    (["eval", "--checkpoint", "no/such/folder"], "checkpoint folder no/such/folder does not exist"),
    (["adapt", "--checkpoint", "no/such/folder"], "does not exist"),
    (["train", "--task", "imagenet"], "invalid choice: 'imagenet'"),
    (["eval", "--checkpoint", ".", "--budgets", "0.5", "1.5"], "a budget ratio must be in (0, 1], got 1.5"),
    (["train", "--budget", "0"], "a token count budget must be >= 1, got 0"),
    (["train", "--budget", "0.0"], "a budget ratio must be in (0, 1], got 0.0"),
    (["train", "--config", "no/such.yaml"], "config file 'no/such.yaml' not found"),
    (["train", "--override", "rules.allocator"], "an override is KEY=VALUE"),
    (["eval", "--checkpoint", "."], "config.json is missing: not an arrcoc checkpoint folder"),
])
def test_bad_input_exits_with_a_message(argv, message, capsys):
    with pytest.raises(SystemExit) as exit_:
        main(argv)
    assert exit_.value.code == 2
    error = capsys.readouterr().err
    assert message in error and "Traceback" not in error


def test_unknown_setting_in_a_command_config_is_named(checkpoint, tmp_path, capsys):
    settings = tmp_path / "bad.yaml"
    settings.write_text("budgetz: [0.5]\n")
    with pytest.raises(SystemExit) as exit_:
        main(["eval", "--checkpoint", str(checkpoint), "--config", str(settings)])
    assert exit_.value.code == 2 and "unknown setting key(s) ['budgetz']" in capsys.readouterr().err


def test_parse_override_reads_yaml_values():
    assert parse_override("rules.allocator={name: backprop}") == ("rules.allocator", {"name": "backprop"})
    assert parse_override("participatory=false") == ("participatory", False)
