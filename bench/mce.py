"""The loss's cost: time and peak memory of forward + backward, on CPU or one GPU.

    python bench/mce.py                                  # MCE vs one cross-entropy over the same logits (V = 128,256)
    python bench/mce.py --head --positions 2048          # LM head + loss: full logits, chunked (training), fused
    python bench/mce.py --head --positions 16384 --dim 576 --dtype bfloat16   # on a GPU: the 270M micro-batch
    python bench/mce.py --json OUT.json ...              # also write the rows as JSON

Without --head the losses read ready-made logits: "ce" (F.cross_entropy), "mce" (tst.mce_loss, one logsumexp for all
s targets) and, with --paper-loop, "loop" (the paper's s cross-entropies). With --head they start from hidden states h
(positions, dim) and the head weight (V, dim): "logits" (h @ W.T whole, a float32 copy, tst.mce_loss), "chunked"
(model.chunked_loss with tst.mce_loss: what training runs) and "fused" (the hand-derived fused gradient this project
trained with before, kept here as the yardstick the chunked path must stay near: within 1.15x in time and 1.2x in
memory). The bag loss is tst.mce_loss, or tst.sum_to_one_loss with --sum_to_one.
Peak memory is the high-water mark above the inputs: CUDA's allocator statistics on a GPU; on CPU the process's peak
resident set, each case in a fresh process so that one case's peak cannot hide another's.
"""

import argparse
import functools
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


def loss_function(name, s, sum_to_one):
    weights = tst.bag_weights(s)

    def bag_loss(logits, targets, **normalisers):
        if sum_to_one:
            return tst.sum_to_one_loss(logits, targets, normalisers.get("scored_positions"))
        return tst.mce_loss(logits, targets, weights, normalisers.get("column_counts"))

    def chunked(h, w, targets):
        valid = targets != tst.IGNORE_INDEX
        return model.chunked_loss(h, w, targets, functools.partial(
            bag_loss, column_counts=valid.sum(0), scored_positions=valid.any(1).sum()))

    return {
        "ce": lambda logits, targets: F.cross_entropy(logits, targets[:, 0]),
        "mce": bag_loss,
        "loop": lambda logits, targets: sum(weights[i] * F.cross_entropy(logits, targets[:, i]) for i in range(s)),
        "logits": lambda h, w, targets: bag_loss(F.linear(h, w).float(), targets),
        "chunked": chunked,
        "fused": lambda h, w, targets: fused_head_loss(h, w, targets, weights),
    }[name]


# -----------------------------------------------------------------------------
# The yardstick: the LM head and MCE with a hand-derived gradient, computed in the same pass as the loss (as Liger's
# fused linear cross-entropy does for one target). This project trained with it before the loss moved into tst.py;
# it is MCE only, and kept here to measure what the generic chunked path costs.

def fused_head_loss(h, weight, targets, target_weights):
    """MCE of the LM head `weight` (V, dim) on h (N, dim) against targets (N, k): the gradient with respect to the
    logits z_n is C_n * softmax(z_n) - sum_i c[n, i] * onehot(y_ni), c[n, i] = w_i / (valid entries of column i) /
    sum of w, C_n = sum_i c[n, i]; computed chunk by chunk as model.chunked_loss chunks (2**27 logits then)."""
    valid = targets != tst.IGNORE_INDEX
    count = valid.sum(0)
    w = target_weights.to(h.device, torch.float32) * (count > 0)
    coef = valid * (w / count.clamp(min=1) / w.sum())
    safe_targets = targets.masked_fill(~valid, 0)
    return _Fused.apply(h, weight, safe_targets, coef)


class _Fused(torch.autograd.Function):
    @staticmethod
    def forward(ctx, h, weight, targets, coef):
        chunk = max(1, 2**27 // weight.size(0))
        dtype = torch.get_autocast_dtype(h.device.type) if torch.is_autocast_enabled(h.device.type) else h.dtype
        head, coef_sum = weight.to(dtype), coef.sum(1)
        loss = torch.zeros((), device=h.device)
        grad_h = torch.empty_like(h)
        grad_weight = torch.zeros(weight.shape, dtype=torch.float32, device=weight.device)
        with torch.autocast(h.device.type, enabled=False):
            for a in range(0, h.size(0), chunk):
                rows = slice(a, a + chunk)
                h_chunk = h[rows].to(dtype)
                z = (h_chunk @ head.t()).float()
                lse = torch.logsumexp(z, dim=-1)
                loss = loss + (coef_sum[rows] * lse).sum() - (coef[rows] * z.gather(1, targets[rows])).sum()
                z.sub_(lse[:, None]).exp_().mul_(coef_sum[rows, None])  # C_n * softmax(z_n), in place
                z.scatter_add_(1, targets[rows], -coef[rows])
                g = z.to(dtype)
                grad_h[rows] = g @ head
                grad_weight += g.t() @ h_chunk
        ctx.save_for_backward(grad_h, grad_weight)
        ctx.weight_dtype = weight.dtype
        return loss

    @staticmethod
    def backward(ctx, grad_loss):
        grad_h, grad_weight = ctx.saved_tensors
        return grad_h * grad_loss.to(grad_h.dtype), (grad_weight * grad_loss).to(ctx.weight_dtype), None, None


def measure_one(args):
    """Runs in a child process: prints {"ms", "peak_mb", "device"} for one (loss, s)."""
    device = "cuda" if torch.cuda.is_available() else "cpu"
    dtype = getattr(torch, args.dtype)
    torch.manual_seed(0)
    targets = torch.randint(0, args.vocab, (args.positions, args.s), device=device)
    if args.loss in ("logits", "chunked", "fused"):
        inputs = [torch.randn(args.positions, args.dim, device=device, dtype=dtype).requires_grad_(),
                  (0.02 * torch.randn(args.vocab, args.dim, device=device, dtype=dtype)).requires_grad_()]
    else:
        inputs = [torch.randn(args.positions, args.vocab, device=device, dtype=dtype).requires_grad_()]
    targets[torch.rand(targets.shape, device=device) < 0.1] = tst.IGNORE_INDEX  # missing targets, as at a row's end
    loss_fn = loss_function(args.loss, args.s, args.sum_to_one)

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
    parser.add_argument("--sum_to_one", action="store_true", help="the bag loss is tst.sum_to_one_loss (no fused)")
    parser.add_argument("--paper-loop", action="store_true", help="also time the paper's loop (slow: s CEs)")
    parser.add_argument("--json", help="also write the rows to this file")
    parser.add_argument("--loss", default=None, help=argparse.SUPPRESS)  # set in the child process
    args = parser.parse_args()
    if args.loss:
        args.s = args.s[0]
        return measure_one(args)

    def run(loss, s):
        cmd = [sys.executable, __file__, "--loss", loss, "--s", str(s), "--vocab", str(args.vocab), "--positions",
               str(args.positions), "--dim", str(args.dim), "--dtype", args.dtype, "--repeats", str(args.repeats)]
        cmd += ["--sum_to_one"] * args.sum_to_one
        return json.loads(subprocess.run(cmd, capture_output=True, text=True, check=True).stdout)

    if args.head:
        cases, ratios = ["logits", "chunked"] + ["fused"] * (not args.sum_to_one), [("chunked", "logits")]
        ratios += [] if args.sum_to_one else [("chunked", "fused")]
    else:
        cases, ratios = ["ce", "mce"] + ["loop"] * args.paper_loop, [("mce", "ce")] + [("loop", "ce")] * args.paper_loop
    print(f"V={args.vocab} positions={args.positions}" + (f" dim={args.dim}" if args.head else "")
          + f" dtype={args.dtype} loss={'sum_to_one' if args.sum_to_one else 'mce'} torch {torch.__version__} "
          f"threads {torch.get_num_threads()}")
    print(f"{'s':>3}" + "".join(f" {c + ' ms':>11} {c + ' MB':>10}" for c in cases)
          + "".join(f" {a + '/' + b:>15}" for a, b in ratios) + " (time, memory)")
    rows = []
    for s in args.s:
        result = {c: run(c, s) for c in cases}
        line = f"{s:>3}" + "".join(f" {result[c]['ms']:11.1f} {result[c]['peak_mb']:10.0f}" for c in cases)
        for a, b in ratios:
            line += f" {result[a]['ms'] / result[b]['ms']:7.2f} {result[a]['peak_mb'] / result[b]['peak_mb']:7.2f}"
        print(line)
        rows.append({"s": s, **result})
    device = rows[-1][cases[0]]["device"]
    print(f"device: {torch.cuda.get_device_name() if device == 'cuda' else 'CPU'}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"args": vars(args), "rows": rows}, f, indent=1)


if __name__ == "__main__":
    main()
