"""The canvas VQA benchmark runs every method at every budget and reports what it measured (its quick mode, on a tiny
VLM trained on the spot), and its parts measure what they say."""

import json

import pytest
import torch

from arrcoc.bench import vqa, vqa_report
from arrcoc.data.vqa import vqa_split


def test_kept_tokens_on_the_answers_digits_are_counted_by_their_patch_centres():
    batch = vqa_split("test", 2, seed=0)
    slot = batch.relevant[0].nonzero()[0, 0]
    x0, y0, x1, y1 = (batch.boxes[0, slot] / 8).tolist()
    inside = int(y0 + 1) * 16 + int(x0 + 1)  # a patch whose centre is well inside the box
    corner_far = 0 if (x0 > 2 or y0 > 2) else 255
    kept = torch.tensor([[inside, corner_far], [inside, corner_far]])
    share = vqa.on_digits(kept, batch.rows([0, 0]))
    assert share.tolist() == [0.5, 0.5]


def test_the_quick_benchmark_measures_every_method_at_every_budget(tmp_path):
    out = vqa.main(["--quick", "--threads", "1", "--out", str(tmp_path)])
    results = json.loads((out / "vqa.json").read_text())
    budgets = [str(b) for b in vqa.QUICK.budgets]
    test = vqa.QUICK.test_canvases
    assert set(results["methods"]) == {*vqa_report.BASELINES, "oracle"}
    for method, by_budget in results["methods"].items():
        assert list(by_budget) == budgets
        for budget, runs in by_budget.items():
            assert len(runs) == (vqa.QUICK.seeds if method == "random" else 1)
            assert all(0 <= runs[0]["accuracy"][s] <= 100 for s in ("local", "global", "all"))
            # every prompt keeps exactly K visual tokens, counted where they lie
            assert sum(runs[0]["positions"]) == int(budget) * test, (method, budget)
    arr = results["arrcoc"]["accuracy"]
    assert list(arr) == budgets and all(len(arr[b]) == vqa.QUICK.seeds for b in budgets)
    assert sum(arr["8"][0]["positions"]) == 8 * test
    for size in ("1", "16"):
        for budget in budgets:
            ratios = results["timing"][size][budget]
            assert set(ratios) == {"full", "ARR-COC", *vqa_report.BASELINES} and all(r > 0 for r in ratios.values())
    assert len(results["adaptation"]["seeds"]) == vqa.QUICK.seeds
    assert results["pyramiddrop"]["mean_tokens"] == (256 + 128 + 64 + 32) / 4
    markdown = (out / "vqa.md").read_text()
    assert markdown.count("PASS") + markdown.count("FAIL") + markdown.count("NO VERDICT") >= len(
        vqa_report.targets(results))
    assert (out / "vqa_accuracy.png").stat().st_size > 0 and (out / "vqa_positions.png").stat().st_size > 0
    assert (out / "models" / "vqa").is_dir()
    # the canvas benchmark's report carries these targets when it finds vqa.json beside its results
    from arrcoc.bench.canvas_report import _vqa_section

    section = "\n".join(_vqa_section(out, "results"))
    assert "## Canvas VQA" in section and "local questions at 8/256" not in section  # the local target is at 16
    assert section.count("- **") + section.count("- **NO VERDICT**") >= len(vqa_report.targets(results))


def test_a_global_target_against_a_baseline_that_counts_at_chance_gets_no_verdict():
    def entry(global_, count):
        return [{"accuracy": {"global": global_, "count": count}}]

    results = {"arrcoc": {"accuracy": {"8": entry(30.0, 25.0) * 5}},
               "methods": {m: {"8": entry(40.0, 60.0)} for m in vqa_report.QUERY_AGNOSTIC}}
    passed, text = vqa_report._global_target(results, "8")
    assert passed is False and "no verdict" not in text  # 10 points below a baseline that counts
    results["methods"]["random"]["8"] = entry(49.0, vqa_report.COUNT_CHANCE + 1)
    passed, text = vqa_report._global_target(results, "8")
    assert passed is None and "random answers count questions at chance" in text


def test_timing_repeats_name_one_count_per_timing_batch_size():
    with pytest.raises(ValueError, match=r"timing_repeats gives the repeats of each timing batch size: 2 sizes"):
        vqa.VQABenchSettings(timing_repeats=(15,))


def test_a_prefill_within_the_timing_noise_of_the_line_gets_no_verdict():
    def timing(ours):
        ratios = dict.fromkeys(vqa_report.BASELINES, 0.9) | {"random": 0.70, "grid": 0.714, "pool": 0.72}
        return {"timing": {"1": {"16": ratios | {"full": 1.0, "ARR-COC": ours}}}}

    (near, text), = vqa_report._time_targets(timing(0.70 * 1.1 * 1.01))  # 1% over the line, the same work 2.9% apart
    assert near is None and "within the timing noise" in text
    assert vqa_report._time_targets(timing(0.70 * 1.1 * 1.05))[0][0] is False
    assert vqa_report._time_targets(timing(0.70 * 1.1 * 0.95))[0][0] is True
