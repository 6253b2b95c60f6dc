"""One MoE layer at the 10B-A1B shape, forward + backward: the per-expert loop against the grouped GEMM.

    python bench/moe_layer.py     # CUDA if present (16,384 tokens, bfloat16), else CPU (2,048 tokens, float32)
    python bench/moe_layer.py --tokens 4096 --dtype bfloat16 --repeats 5
    python bench/moe_layer.py --threads 1   # on a shared CPU: busy neighbours stall OpenMP's thread barriers

The layer is moe.MoE with model.NAMED_SHAPES["10b-a1b"]'s shape (dim 1024, 128 experts of 512, top-8) and a
freshly initialised router, so the load is roughly balanced. The input requires grad, as inside a model. Timed:
forward, a sum of the output (plus the aux loss) as the loss, backward; the median of --repeats after one warm-up.
Also printed: how far the grouped path's output and gradients are from the loop's on the same input.
"""

import argparse
import os
import statistics
import sys
import time
from dataclasses import replace

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from model import NAMED_SHAPES  # noqa: E402
from moe import GROUPED_MM, MoE  # noqa: E402


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def step(moe, x):
    moe.zero_grad(set_to_none=True)
    x.grad = None
    out, aux = moe(x)
    (out.float().sum() + aux).backward()
    moe.tokens_per_expert.zero_()
    return out


def measure(moe, x, repeats):
    device = x.device
    step(moe, x)  # warm-up: allocator, kernels
    times = []
    for _ in range(repeats):
        sync(device)
        t = time.perf_counter()
        step(moe, x)
        sync(device)
        times.append(time.perf_counter() - t)
    return statistics.median(times)


def main():
    cuda = torch.cuda.is_available()
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--tokens", type=int, default=16384 if cuda else 2048)
    p.add_argument("--dtype", default="bfloat16" if cuda else "float32")
    p.add_argument("--repeats", type=int, default=10 if cuda else 3)
    p.add_argument("--impls", default="loop,grouped")
    p.add_argument("--threads", type=int, default=0, help="CPU threads (0: torch's default)")
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    device = torch.device("cuda" if cuda else "cpu")
    dtype = getattr(torch, args.dtype)
    cfg = replace(NAMED_SHAPES["10b-a1b"], experts_impl="loop")
    name = torch.cuda.get_device_name() if cuda else f"CPU ({torch.get_num_threads()} threads)"
    print(f"device: {name}; torch {torch.__version__}; grouped GEMM: "
          f"{'none' if GROUPED_MM is None else GROUPED_MM.__module__ + '.' + GROUPED_MM.__name__}")
    if not cuda:
        print("no CUDA device: CPU figures only (the grouped GEMM's speed matters on a GPU)")
    print(f"layer: dim {cfg.dim}, {cfg.n_experts} experts of {cfg.expert_ffn_dim}, top-{cfg.top_k}; "
          f"{args.tokens} tokens, {args.dtype}, median of {args.repeats}")

    torch.manual_seed(0)
    moe = MoE(cfg).to(device=device, dtype=dtype)
    x = torch.randn(1, args.tokens, cfg.dim, device=device, dtype=dtype, requires_grad=True)
    # active matmul FLOPs per token, forward + backward: router + top_k experts
    flops = 6 * (cfg.n_experts * cfg.dim + cfg.top_k * 3 * cfg.dim * cfg.expert_ffn_dim)

    results = {}
    for impl in args.impls.split(","):
        moe.experts.impl = impl
        try:
            seconds = measure(moe, x, args.repeats)
        except (RuntimeError, NotImplementedError) as e:
            print(f"{impl:8s} failed: {str(e).splitlines()[0]}")
            continue
        out = step(moe, x)
        results[impl] = [out.detach().float(), x.grad.float()] + [p.grad.float() for p in moe.parameters()]
        print(f"{impl:8s} {seconds * 1e3:9.1f} ms  {args.tokens / seconds:12,.0f} tokens/s  "
              f"{flops * args.tokens / seconds / 1e12:7.2f} TFLOP/s")
    if len(results) == 2:
        a, b = results.values()
        worst = max(((u - v).abs().max() / v.abs().max().clamp(min=1e-12)).item() for u, v in zip(a, b))
        print(f"grouped vs loop: largest difference, relative to each tensor's largest entry: {worst:.2e} "
              f"(output, input gradient, router and expert gradients)")


if __name__ == "__main__":
    main()
