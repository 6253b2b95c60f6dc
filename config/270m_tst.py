# The paper's 270M TST run: the baseline's settings with s = 6 and r = 0.3 (6k of 20k steps in superposition,
# reading 105B data tokens in all against the baseline's 42B). Paper: final loss 3.212 -> 3.142.
from pathlib import Path

exec(Path(__file__).with_name("270m_baseline.py").read_text())
out_dir = "out/270m_tst"
s = 6
r = 0.3
bag_weights = "uniform"
