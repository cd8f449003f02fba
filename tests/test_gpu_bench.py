"""The one-shot GPU suite's CPU-runnable parts: each part on tiny sizes, the time limit, the report."""

from __future__ import annotations

import json
import subprocess
import sys
from dataclasses import replace

import torch

from arrcoc.bench import gpu
from arrcoc.config import REPO_ROOT

TINY = replace(gpu.QUICK, repeats=1, warmup=0)


def test_parts_measure_and_report(tmp_path) -> None:
    deadline = gpu.Deadline(minutes=10)
    saves = []
    runs: list = []
    gpu.timm_throughput(TINY, "cpu", deadline, lambda: saves.append(1), (("float32", "eager"),), runs)
    canvas: list = []
    gpu.canvas_timing(replace(TINY, canvas_batch=2), "cpu", deadline, lambda: saves.append(1), canvas)
    assert len(runs) == 1 and set(runs[0]["results"]) == {"vit_tiny"} and set(runs[0]["latency"]) == set()
    rows = runs[0]["results"]["vit_tiny"]["rows"]
    assert {r["method"] for r in rows} == set(TINY.methods) and all(r["speedup"] > 0 for r in rows)
    assert [(c["dtype"], c["graphs"]) for c in canvas] == [("float32", False), ("bfloat16", False)] and len(saves) == 3
    assert {r["method"] for r in canvas[0]["rows"]} == {"full", "random", "ARR-COC", "ARR-COC relevance module"}
    meta = {"mode": "quick", "command": "test", "device": "cpu", "torch": torch.__version__, "commit": None,
            "wall_seconds": 1.0, "skipped": ["timm vit_tiny, float32, compiled"]}
    markdown = gpu.report(runs, canvas, None, meta, tmp_path)
    assert "## timm ViTs, float32, eager" in markdown and "## Canvas benchmark timing" in markdown
    assert "Not measured (past the time limit): timm vit_tiny, float32, compiled." in markdown
    assert (tmp_path / "gpu_throughput.png").is_file()


def test_parts_past_the_time_limit_are_listed_not_run(tmp_path) -> None:
    out = gpu.main(["--quick", "--device", "cpu", "--minutes", "0", "--out", str(tmp_path)])
    meta = json.loads((out / "gpu_throughput.json").read_text())["meta"]
    assert meta["skipped"] == ["timm vit_tiny, bfloat16, eager", "timm vit_tiny, bfloat16, ARR-COC graph-captured",
                               "VLM prefill", "canvas timing, float32, ARR-COC eager",
                               "canvas timing, bfloat16, ARR-COC eager", "timm vit_tiny, float32, eager",
                               "timm vit_tiny, bfloat16, compiled", "timm vit_tiny, float32, compiled"]
    assert json.loads((out / "gpu_canvas.json").read_text())["runs"] == []
    assert "Not measured" in (out / "gpu.md").read_text()


def test_shell_script_runs_from_the_checkout(tmp_path) -> None:
    """benchmarks/gpu.sh is how a bare GPU machine runs the suite: no install, the repo on PYTHONPATH."""
    done = subprocess.run(["bash", str(REPO_ROOT / "benchmarks" / "gpu.sh"), str(tmp_path), "--quick",
                           "--device", "cpu", "--minutes", "0"], capture_output=True, text=True,
                          env={"PATH": "/usr/bin:/bin", "PYTHON": sys.executable}, timeout=300)
    assert done.returncode == 0, done.stderr
    assert (tmp_path / "gpu.md").is_file()
