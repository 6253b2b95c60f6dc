# The paper's 10B-A1B TST run: 50k steps, the first 12.5k (r = 0.25) in superposition with bags of s = 16
# weighted 1/i; same model, batch and learning rate as the baseline. Data: 12.5k x 16 x 8M + 37.5k x 8M = 2.0T
# tokens for the FLOPs of 50k baseline steps (the paper: 2.236 final loss vs the 125k-step baseline's 2.252).
#   torchrun --nproc_per_node=8 train.py -- config/10b_a1b_tst.py
from pathlib import Path

exec(Path(__file__).with_name("10b_a1b_baseline.py").read_text())

out_dir = "out/10b_a1b_tst"
max_steps = 50_000
s = 16
r = 0.25
bag_weights = "power"  # 1/i: better and more stable than uniform for s >= 8
tst_mode = "full"
