"""The MNIST rule benchmark command runs end to end and writes its three outputs."""

import json

from arrcoc.bench.rules_mnist import block_slice, checks, main


def test_block_slices():
    assert block_slice("all", 3) == slice(0, 3)
    assert block_slice(0, 3) == slice(0, 1) and block_slice(-1, 3) == slice(-1, None)
    assert block_slice("0:-1", 3) == slice(0, -1)


def test_quick_run_writes_json_markdown_and_png(tmp_path):
    main(["--quick", "--rows", "backprop", "hebbian-soft-wta", "--out", str(tmp_path)])
    result = json.loads((tmp_path / "rules_mnist.json").read_text())
    assert set(result["results"]) == {"backprop", "hebbian-soft-wta"}
    assert result["results"]["backprop"]["accuracy_mean"] > 80.0  # 2 epochs on 4,000 real digits
    assert "| backprop |" in (tmp_path / "rules_mnist.md").read_text()
    assert (tmp_path / "rules_mnist.png").stat().st_size > 1000


def test_checks_report_gaps_and_ordering():
    rows = {
        "bp": {"family": "backprop", "accuracy_mean": 95.0},
        "fa": {"family": "fa", "accuracy_mean": 94.0},
        "heb": {"family": "hebbian", "accuracy_mean": 90.0},
    }
    verdicts = dict(checks(rows))
    assert [ok for text, ok in checks(rows) if text.startswith("backprop - fa")] == [True]
    assert [ok for text, ok in checks(rows) if text.startswith("backprop - hebbian")] == [False]
    assert any(ok is None for ok in verdicts.values())  # the ep row is missing
