"""
Is TokenLoader ever the bottleneck? Rows per second in both TST phases at the 270M shape (T = 2048, s = 6: rows of
2049 and 12289 tokens, pieces of windows of 12288), against the rows per second one H200 consumes at that shape.

    python bench/data_throughput.py [--data_dir data/books_bytes] [--batch_size 16] [--seconds 3]

Prepares the books corpus (corpus/) into --data_dir first if it holds no data. A row is L + 1 tokens from its own place in the
split (data.py's docstring), its ids checked against the vocabulary as they are read. The shards are read from the
page cache after the first pass, as on a training node whose data fits in memory; from disk, phase 1 needs about
rows/s * 12289 * 2 bytes (uint16) or * 4 (uint32) per second, a few MB/s, in reads of one row each.
"""

import argparse
import contextlib
import io
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import data  # noqa: E402
import prepare  # noqa: E402
from model import NAMED_SHAPES  # noqa: E402

T, S = 2048, 6
H200_PEAK, MFU = 989e12, 0.4  # dense bf16 FLOP/s, and a good utilisation for a model this small

parser = argparse.ArgumentParser()
parser.add_argument("--data_dir", default="data/books_bytes")
parser.add_argument("--batch_size", type=int, default=16)
parser.add_argument("--seconds", type=float, default=3.0)
args = parser.parse_args()
if not (Path(args.data_dir) / "meta.json").exists():
    prepare.prepare("books", "bytes", args.data_dir)

flops = NAMED_SHAPES["270m"].flops_per_position(T)
positions = MFU * H200_PEAK / flops
need = positions / T  # the model sees T positions a row in both phases
print(f"one H200 at {MFU:.0%} MFU on the 270M shape: {flops / 1e9:.3f} GFLOP a position, {positions:,.0f} positions/s "
      f"= {need:,.1f} rows/s in either phase ({need * S * T / 1e6:.2f}M data tokens/s in phase 1, "
      f"{need * T / 1e6:.2f}M in phase 2)")

loader = data.TokenLoader(args.data_dir, "train", args.batch_size, window=S * T)
print(f"TokenLoader on {args.data_dir} ({loader.tokens:,} train tokens, {data.load_meta(args.data_dir)['dtype']}), "
      f"batch_size {args.batch_size}:")
for phase, L in (("phase 1 (superposition)", S * T), ("phase 2 (recovery)", T)):
    rows, t0 = 0, time.perf_counter()
    with contextlib.redirect_stdout(io.StringIO()):  # a small corpus wraps many times a second: not news here
        while time.perf_counter() - t0 < args.seconds:
            loader.next_rows(L)
            rows += args.batch_size
    rate = rows / (time.perf_counter() - t0)
    print(f"  {phase:24s} rows of {L + 1:5d}: {rate:10,.0f} rows/s {rate * L / 1e6:8,.1f}M tokens/s "
          f"= {rate / need:7,.0f}x one H200")
