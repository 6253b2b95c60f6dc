"""Cost of tst.mce_loss (forward + backward) against one ordinary cross-entropy over the same logits.

    python bench/mce.py                 # V = 128,256, 4 x 256 positions, s in 1 4 8 16, on CPU or CUDA
    python bench/mce.py --positions 8192 --dtype bfloat16   # on a GPU

Peak memory is the high-water mark above the logits themselves: CUDA's allocator statistics on a GPU; on
CPU the process's peak resident set, each case measured in a fresh process so one case's peak cannot hide
another's. The paper's loop of s cross-entropies is timed too, for reference.
"""

import argparse
import json
import os
import resource
import subprocess
import sys
import time

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import tst  # noqa: E402


def losses(name, s):
    weights = tst.bag_weights(s)
    if name == "ce":
        return lambda logits, targets: F.cross_entropy(logits, targets[:, 0])
    if name == "mce":
        return lambda logits, targets: tst.mce_loss(logits, targets, weights)
    return lambda logits, targets: sum(  # the paper's loop
        weights[i] * F.cross_entropy(logits, targets[:, i]) for i in range(s)
    )


def inputs(args, s, device):
    torch.manual_seed(0)
    logits = torch.randn(args.positions, args.vocab, device=device, dtype=getattr(torch, args.dtype))
    targets = torch.randint(0, args.vocab, (args.positions, s), device=device)
    return logits.requires_grad_(), targets


def step(loss_fn, logits, targets):
    logits.grad = None
    loss_fn(logits, targets).backward()


def measure_one(args):
    """Runs in a child process: prints {"ms": ..., "peak_mb": ...} for one (loss, s)."""
    device = "cuda" if torch.cuda.is_available() else "cpu"
    logits, targets = inputs(args, args.s, device)
    loss_fn = losses(args.loss, args.s)
    if device == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        step(loss_fn, logits, targets)
        torch.cuda.synchronize()
        peak = torch.cuda.max_memory_allocated() - base
    else:
        base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
        step(loss_fn, logits, targets)
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 - base
    for _ in range(2):  # warm-up
        step(loss_fn, logits, targets)
    times = []
    for _ in range(args.repeats):
        if device == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        step(loss_fn, logits, targets)
        if device == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
    times.sort()
    print(json.dumps({"ms": 1000 * times[len(times) // 2], "peak_mb": peak / 2**20, "device": device}))


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--vocab", type=int, default=128_256)
    parser.add_argument("--positions", type=int, default=1024)
    parser.add_argument("--dtype", default="float32")
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--s", type=int, nargs="+", default=[1, 4, 8, 16])
    parser.add_argument("--paper-loop", action="store_true", help="also time the paper's loop (slow: s CEs)")
    parser.add_argument("--loss", default=None, help=argparse.SUPPRESS)  # set in the child process
    args = parser.parse_args()
    if args.loss:
        args.s = args.s[0]
        return measure_one(args)

    def run(loss, s):
        cmd = [sys.executable, __file__, "--loss", loss, "--s", str(s), "--vocab", str(args.vocab),
               "--positions", str(args.positions), "--dtype", args.dtype, "--repeats", str(args.repeats)]
        return json.loads(subprocess.run(cmd, capture_output=True, text=True, check=True).stdout)

    print(f"V={args.vocab} positions={args.positions} dtype={args.dtype} torch {torch.__version__} "
          f"threads {torch.get_num_threads()}")
    print(f"{'s':>3} {'CE ms':>8} {'MCE ms':>8} {'x CE':>6} {'loop ms':>8} {'x CE':>6} "
          f"{'CE MB':>7} {'MCE MB':>7} {'x CE':>6}")
    for s in args.s:
        ce, mce = run("ce", s), run("mce", s)
        loop = run("loop", s) if args.paper_loop else {"ms": float("nan")}
        print(f"{s:>3} {ce['ms']:8.1f} {mce['ms']:8.1f} {mce['ms'] / ce['ms']:6.2f} {loop['ms']:8.1f} "
              f"{loop['ms'] / ce['ms']:6.2f} {ce['peak_mb']:7.0f} {mce['peak_mb']:7.0f} "
              f"{mce['peak_mb'] / ce['peak_mb']:6.2f}")
    print(f"device: {ce['device']}")


if __name__ == "__main__":
    main()
