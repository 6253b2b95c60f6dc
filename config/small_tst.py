# The single-GPU pair's TST run: s = 4 for the first 30% of the steps (reads 1.9B data tokens vs 1.05B).
from pathlib import Path

exec(Path(__file__).with_name("small_baseline.py").read_text())
out_dir = "out/small_tst"
s = 4
r = 0.3
bag_weights = "uniform"
