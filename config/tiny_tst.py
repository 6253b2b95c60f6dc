# The tiny run with Token Superposition Training: the baseline's settings, then bags of s = 4 tokens for the
# first 30% of the steps. Same FLOPs per step as tiny_baseline.py; phase 1 reads 4x the data.
from pathlib import Path

exec(Path(__file__).with_name("tiny_baseline.py").read_text())
out_dir = "out/tiny_tst"
s = 4
r = 0.3
bag_weights = "uniform"
