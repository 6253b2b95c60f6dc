"""Cost of a TST phase-1 step against a baseline step at equal FLOPs, on random tokens (no data needed).

    python bench/step.py config/270m_tst.py                      # on one GPU: bf16, compiled blocks, fused AdamW
    python bench/step.py config/10b_a1b_tst.py --n_layers 6 --batch_size 2   # a 6-layer slice of the MoE
    python bench/step.py config/tiny_tst.py --steps 20           # on CPU
    python bench/step.py config/270m_tst.py --json OUT.json      # also write the figures as JSON

Both steps process batch_size x seq_len positions through the same model, optimizer and loss code as train.py
(Stage.batch, the model's chunked loss); phase 1 reads rows of s*T+1 tokens (bags, the bag loss), the baseline rows
of T+1 (tokens, CE). Prints, per phase, the median step time, positions/s, data tokens/s, MFU (from positions,
against --peak_flops) and peak GPU memory, and the ratio of the two step times (the goal: phase 1 at most 1.03x).
"""

import argparse
import contextlib
import json
import os
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import train  # noqa: E402
import tst  # noqa: E402
from model import ModelConfig, Transformer  # noqa: E402


def measure(model, optimizer, c, stage, steps, device, autocast):
    T = c["seq_len"]
    row = stage.data_tokens_per_row(T) + 1
    rows = torch.randint(0, c["vocab_size"], (c["batch_size"], row), device=device)
    x, y, loss_fn = stage.batch(rows)

    def step():
        with autocast:
            loss, aux_loss = model(x, y, loss_fn)
        (loss + aux_loss).backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return loss

    for _ in range(3):  # warm-up: compilation and allocator
        step().item()
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    times = []
    for _ in range(steps):
        t0 = time.perf_counter()
        step().item()  # .item() waits for the GPU, as train.py's logging does
        times.append(time.perf_counter() - t0)
    times.sort()
    dt = times[len(times) // 2]
    peak_memory = torch.cuda.max_memory_allocated() / 2**30 if device.type == "cuda" else float("nan")
    return dt, c["batch_size"] * T, c["batch_size"] * (row - 1), peak_memory


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("config")
    parser.add_argument("--batch_size", type=int, default=0, help="rows per step (default: the config's)")
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--n_layers", type=int, default=0, help="a slice of the model: this many layers")
    parser.add_argument("--compile", type=int, default=-1, help="1/0 (default: on with CUDA)")
    parser.add_argument("--peak_flops", type=float, default=989e12, help="per-GPU peak (H100/H200 dense bf16)")
    parser.add_argument("--json", help="also write the figures to this file")
    args = parser.parse_args()
    c = train.parse_config([args.config])
    c["batch_size"] = args.batch_size or c["batch_size"]
    c["n_layers"] = args.n_layers or c["n_layers"]
    if c["vocab_size"] == 0:
        c["vocab_size"] = 257  # the bytes tokenizer of the tiny configs
    cuda = torch.cuda.is_available()
    device = torch.device("cuda" if cuda else "cpu")
    autocast = torch.autocast("cuda", dtype=torch.bfloat16) if cuda else contextlib.nullcontext()
    torch.backends.cuda.matmul.allow_tf32 = True
    cfg = ModelConfig(**{k: c[k] for k in train.MODEL_KEYS})
    model = Transformer(cfg).to(device)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4, betas=(0.9, 0.95), fused=cuda)
    compiled = args.compile == 1 or (args.compile == -1 and cuda)
    if compiled:  # as train.py compiles: block by block, the loss eager
        for block in model.layers:
            block.compile()
    name = torch.cuda.get_device_name() if cuda else "CPU"
    print(f"{args.config}: {cfg.num_params() / 1e6:.1f}M parameters, {c['batch_size']} rows x {c['seq_len']} "
          f"positions, s={c['s']}, mode={c['tst_mode']}, bag_loss={c['bag_loss']}; {name}, torch "
          f"{torch.__version__}, threads {torch.get_num_threads()}, compile={compiled}")
    flops_per_position = cfg.flops_per_position(c["seq_len"])
    results = {}
    schedule = tst.Schedule(c, c["max_steps"])
    for phase, label in ((2, "baseline (phase 2)"), (1, "TST phase 1")):
        stage = schedule.stage(0 if phase == 1 else c["max_steps"] - 1)
        dt, positions, data_tokens, memory = measure(model, optimizer, c, stage, args.steps, device, autocast)
        mfu = flops_per_position * positions / dt / args.peak_flops if cuda else None
        results[label] = {"ms": 1000 * dt, "positions_per_sec": positions / dt, "data_tokens_per_sec": data_tokens / dt,
                          "mfu": mfu, "peak_memory_gib": memory if cuda else None}
        print(f"{label:>20}: {1000 * dt:8.1f} ms/step  {positions / dt:12,.0f} positions/s  "
              f"{data_tokens / dt:12,.0f} data tokens/s  " + (f"MFU {100 * mfu:5.1f}%  peak memory {memory:6.1f} GiB"
                                                              if cuda else "MFU n/a"))
    ratio = results["TST phase 1"]["ms"] / results["baseline (phase 2)"]["ms"]
    print(f"phase-1 step / baseline step: {ratio:.3f}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"config": args.config, "device": name, "batch_size": c["batch_size"], "n_layers": c["n_layers"],
                       "compile": compiled, "phases": results, "ratio": ratio}, f, indent=1)


if __name__ == "__main__":
    main()
