"""The loss's cost: time and peak memory of forward + backward, on CPU or one GPU.

    python bench/mce.py                                  # MCE vs one cross-entropy over the same logits (V = 128,256)
    python bench/mce.py --head --positions 2048          # the LM head + loss: full logits vs model.head_loss
    python bench/mce.py --head --positions 16384 --dim 576 --dtype bfloat16   # on a GPU: the 270M micro-batch

Without --head the losses read ready-made logits: "ce" (F.cross_entropy), "mce" (tst.mce_loss, one log-softmax for
all s targets) and, with --paper-loop, "loop" (the paper's s cross-entropies). With --head they start from hidden
states h (positions, dim) and the head weight (V, dim): "logits" is what train.py did before (h @ W.T, a float32
copy, tst.mce_loss) and "head_loss" is model.head_loss (chunks of logits, gradients computed in the same pass).
Peak memory is the high-water mark above the inputs: CUDA's allocator statistics on a GPU; on CPU the process's peak
resident set, each case in a fresh process so that one case's peak cannot hide another's.
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
import model  # noqa: E402
import tst  # noqa: E402


def loss_function(name, s):
    weights = tst.bag_weights(s)
    return {
        "ce": lambda logits, targets: F.cross_entropy(logits, targets[:, 0]),
        "mce": lambda logits, targets: tst.mce_loss(logits, targets, weights),
        "loop": lambda logits, targets: sum(weights[i] * F.cross_entropy(logits, targets[:, i]) for i in range(s)),
        "logits": lambda h, w, targets: tst.mce_loss(F.linear(h, w).float(), targets, weights),
        "head_loss": lambda h, w, targets: model.head_loss(h, w, targets, weights),
    }[name]


def measure_one(args):
    """Runs in a child process: prints {"ms", "peak_mb", "device"} for one (loss, s)."""
    device = "cuda" if torch.cuda.is_available() else "cpu"
    dtype = getattr(torch, args.dtype)
    torch.manual_seed(0)
    targets = torch.randint(0, args.vocab, (args.positions, args.s), device=device)
    if args.loss in ("logits", "head_loss"):
        inputs = [torch.randn(args.positions, args.dim, device=device, dtype=dtype).requires_grad_(),
                  (0.02 * torch.randn(args.vocab, args.dim, device=device, dtype=dtype)).requires_grad_()]
    else:
        inputs = [torch.randn(args.positions, args.vocab, device=device, dtype=dtype).requires_grad_()]
    loss_fn = loss_function(args.loss, args.s)

    def step():
        for x in inputs:
            x.grad = None
        loss_fn(*inputs, targets).backward()

    if device == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        step()
        torch.cuda.synchronize()
        peak = torch.cuda.max_memory_allocated() - base
    else:
        base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
        step()
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 - base
    times = []
    for i in range(args.repeats + 1):  # the first is a warm-up
        if device == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        step()
        if device == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
    times = sorted(times[1:])
    print(json.dumps({"ms": 1000 * times[len(times) // 2], "peak_mb": peak / 2**20, "device": device}))


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--head", action="store_true", help="compare the LM head + loss paths (from hidden states)")
    parser.add_argument("--vocab", type=int, default=128_256)
    parser.add_argument("--positions", type=int, default=1024)
    parser.add_argument("--dim", type=int, default=576, help="--head: hidden size (576: the 270M model)")
    parser.add_argument("--dtype", default="float32")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--s", type=int, nargs="+", default=[1, 4, 8, 16])
    parser.add_argument("--paper-loop", action="store_true", help="also time the paper's loop (slow: s CEs)")
    parser.add_argument("--loss", default=None, help=argparse.SUPPRESS)  # set in the child process
    args = parser.parse_args()
    if args.loss:
        args.s = args.s[0]
        return measure_one(args)

    def run(loss, s):
        cmd = [sys.executable, __file__, "--loss", loss, "--s", str(s), "--vocab", str(args.vocab), "--positions",
               str(args.positions), "--dim", str(args.dim), "--dtype", args.dtype, "--repeats", str(args.repeats)]
        return json.loads(subprocess.run(cmd, capture_output=True, text=True, check=True).stdout)

    base, new = ("logits", "head_loss") if args.head else ("ce", "mce")
    print(f"V={args.vocab} positions={args.positions}" + (f" dim={args.dim}" if args.head else "")
          + f" dtype={args.dtype} torch {torch.__version__} threads {torch.get_num_threads()}")
    print(f"{'s':>3} {base + ' ms':>10} {new + ' ms':>13} {'ratio':>6} {base + ' MB':>10} {new + ' MB':>13} "
          f"{'ratio':>6}" + (f" {'loop ms':>8} {'x CE':>6}" if args.paper_loop and not args.head else ""))
    for s in args.s:
        a, b = run(base, s), run(new, s)
        line = (f"{s:>3} {a['ms']:10.1f} {b['ms']:13.1f} {b['ms'] / a['ms']:6.2f} {a['peak_mb']:10.0f} "
                f"{b['peak_mb']:13.0f} {b['peak_mb'] / a['peak_mb']:6.2f}")
        if args.paper_loop and not args.head:
            loop = run("loop", s)
            line += f" {loop['ms']:8.1f} {loop['ms'] / a['ms']:6.2f}"
        print(line)
    device = a["device"]
    print(f"device: {torch.cuda.get_device_name() if device == 'cuda' else 'CPU'}")


if __name__ == "__main__":
    main()
