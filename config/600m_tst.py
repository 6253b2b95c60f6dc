# The paper's 600M TST run: s = 6, r = 0.3. Paper: final loss 3.019 -> 2.943.
from pathlib import Path

exec(Path(__file__).with_name("600m_baseline.py").read_text())
out_dir = "out/600m_tst"
s = 6
r = 0.3
bag_weights = "uniform"
