# The pair's TST run: bags of s = 2 tokens for the first 25% of the steps (1,000), then 3,000 next-token steps to
# recover from the switch. The same 16,384 positions per step as books_baseline.py (equal FLOPs); it reads 32.8M
# data tokens in phase 1 and 49.2M after, 81.9M = 2.7 epochs of the books (the baseline: 65.5M, 2.1). s = 2: the
# bag size that wins at tiny scale (README, Results), and the least data.
from pathlib import Path

exec(Path(__file__).with_name("books_baseline.py").read_text())
out_dir = "out/books_tst"
s = 2
r = 0.25
tst_mode = "full"
bag_weights = "uniform"
