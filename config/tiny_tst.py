# The tiny run with Token Superposition Training: the baseline's settings, then bags of s = 2 tokens for the
# first 30% of the steps. Same FLOPs per step as tiny_baseline.py; phase 1 reads 2x the data. The pair is the
# quick start: in 3 seeds TST ends ahead (README, Results; the sweep that chose s and r is in docs/LOG.md).
from pathlib import Path

exec(Path(__file__).with_name("tiny_baseline.py").read_text())
out_dir = "out/tiny_tst"
s = 2
r = 0.3
bag_weights = "uniform"
