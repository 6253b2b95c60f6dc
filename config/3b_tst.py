# The paper's 3B TST run: s = 6, r = 0.3. Paper: final loss 2.808 -> 2.676, matching a 36k-step baseline (1.8x).
from pathlib import Path

exec(Path(__file__).with_name("3b_baseline.py").read_text())
out_dir = "out/3b_tst"
s = 6
r = 0.3
bag_weights = "uniform"
