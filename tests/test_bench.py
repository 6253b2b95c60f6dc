"""The benchmarks run (on CPU, at toy sizes) and bench/gpu.sh's summary reads what they write."""

import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def bench(*args):
    result = subprocess.run([sys.executable, *map(str, args)], cwd=ROOT, capture_output=True, text=True,
                            env={**os.environ, "OMP_NUM_THREADS": "1"}, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    return result.stdout


def test_the_gpu_scripts_benchmarks_and_summary_run_at_toy_sizes(tmp_path):
    bench("bench/step.py", "config/tiny_tst.py", "--steps", "2", "--json", tmp_path / "step_270m.json")
    bench("bench/step.py", "config/tiny_moe_tst.py", "--steps", "2", "--json", tmp_path / "step_10b_a1b_6layers.json")
    head = bench("bench/mce.py", "--head", "--vocab", "1000", "--positions", "64", "--dim", "16", "--s", "4",
                 "--repeats", "1", "--json", tmp_path / "head.json")
    assert "chunked/fused" in head
    bench("bench/mce.py", "--vocab", "1000", "--positions", "64", "--s", "4", "--repeats", "1", "--json",
          tmp_path / "mce.json")
    (tmp_path / "gpu.txt").write_text("CPU\n")
    summary = bench("bench/gpu_summary.py", tmp_path)
    assert "| config/tiny_tst.py (16 rows, 4 layers) | TST phase 1 |" in summary and "| 4 |" in summary
    figures = json.loads((tmp_path / "gpu.json").read_text())
    assert figures["step_270m"]["phases"]["TST phase 1"]["data_tokens_per_sec"] > 0
    assert [row["s"] for row in figures["mce"]["rows"]] == [4]
