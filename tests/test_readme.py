"""The README's quick start runs as written, in order, in a fresh copy of the project (with fewer steps)."""

import re
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
FEWER_STEPS = ["--max_steps=20", "--warmup_steps=2", "--eval_interval=10", "--eval_tokens=4096"]


def quick_start_commands():
    text = (ROOT / "README.md").read_text()
    section = text.split("## Quick start", 1)[1].split("\n## ", 1)[0]
    block = re.search(r"\n\n((?:    .*\n)+)", section).group(1)
    return [shlex.split(line.split("#", 1)[0]) for line in block.splitlines()]


def test_the_quick_start_runs_as_written(tmp_path):
    commands = quick_start_commands()
    assert [c[:2] for c in commands] == [["python", "train.py"], ["python", "train.py"], ["python", "eval.py"],
                                         ["python", "tools/compare.py"]]
    for path in ROOT.glob("*.py"):  # a fresh copy: the project's files, no data, no runs
        shutil.copy(path, tmp_path / path.name)
    for folder in ("config", "tools", "corpus"):
        shutil.copytree(ROOT / folder, tmp_path / folder, ignore=shutil.ignore_patterns("__pycache__"))
    outputs = []
    for command in commands:
        extra = FEWER_STEPS if command[1] == "train.py" else []
        result = subprocess.run([sys.executable, *command[1:], *extra], cwd=tmp_path, capture_output=True, text=True,
                                timeout=600)
        assert result.returncode == 0, f"{shlex.join(command)}:\n{result.stdout[-2000:]}\n{result.stderr[-3000:]}"
        outputs.append(result.stdout)
    assert "heldout_val" in outputs[2]
    table = outputs[3]
    assert "tiny_baseline" in table and "tiny_tst" in table
