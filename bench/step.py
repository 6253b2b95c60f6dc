"""Cost of a TST phase-1 step against a baseline step at equal FLOPs, on random tokens (no data needed).

    python bench/step.py config/270m_tst.py                      # on one GPU: bf16, compiled blocks, fused AdamW
    python bench/step.py config/10b_a1b_tst.py --n_layers 6 --batch_size 2   # a 6-layer slice of the MoE
    python bench/step.py config/tiny_tst.py --steps 20           # on CPU
    python bench/step.py config/270m_tst.py --json OUT.json      # also write the figures as JSON

Both steps are train.py's own train_step (Stage.batch, the model's chunked loss, AdamW, clipping), on batch_size x
seq_len positions of random tokens; phase 1 reads rows of s*T+1 tokens (bags, the bag loss), the baseline rows
of T+1 (tokens, CE). Prints, per phase, the median step time, positions/s, data tokens/s, MFU (from positions,
against --peak_flops) and peak GPU memory, and the ratio of the two step times (the goal: phase 1 at most 1.03x).
"""

import argparse
import json
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import config as settings  # noqa: E402
import train  # noqa: E402
import tst  # noqa: E402  # TST


class RandomRows:
    """The loader's next_rows on random tokens: a benchmark needs no data."""

    def __init__(self, batch_size, vocab_size):
        self.batch_size, self.vocab_size = batch_size, vocab_size

    def next_rows(self, L):
        return torch.randint(0, self.vocab_size, (self.batch_size, L + 1))  # on the CPU, as the loader's rows


def measure(run, step, steps):
    """train.py's own train_step at `step` (its stage): the record of median time after 3 warm-up steps, and the peak
    GPU memory."""
    for _ in range(3):  # warm-up: compilation and allocator
        train.train_step(run, step)
    if run.device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    records = sorted((train.train_step(run, step)[0] for _ in range(steps)), key=lambda r: r["dt"])  # ends in .item()
    peak_memory = torch.cuda.max_memory_allocated() / 2**30 if run.device.type == "cuda" else None
    return records[len(records) // 2], peak_memory


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
    c = settings.load([args.config])
    c["batch_size"] = args.batch_size or c["batch_size"]
    c["n_layers"] = args.n_layers or c["n_layers"]
    c["vocab_size"] = c["vocab_size"] or 257  # the bytes tokenizer of the tiny configs
    cuda = torch.cuda.is_available()
    device = torch.device("cuda" if cuda else "cpu")
    c["compile"] = args.compile == 1 or (args.compile == -1 and cuda)
    c["global_batch_tokens"], c["grad_clip"], c["lr"], c["warmup_steps"] = 0, 1.0, 1e-4, 0
    torch.backends.cuda.matmul.allow_tf32 = True
    raw_model, model, optimizer, autocast = train.build_model(c, device, torch.bfloat16 if cuda else torch.float32)
    B, T = c["batch_size"], c["seq_len"]
    run = train.Run(config=c, argv=[], rank=0, world=1, device=device, raw_model=raw_model, model=model,
                    optimizer=optimizer, autocast=autocast, loader=RandomRows(B, c["vocab_size"]),
                    val_rows=None, grad_accum=1, rows_per_step=B,
                    schedule=tst.Schedule(c),  # TST
                    flops_per_position=raw_model.flops_per_position(T), peak_flops=args.peak_flops if cuda else 0.0,
                    tokenizer=None, totals={"positions": 0, "data_tokens": 0, "flops": 0})
    name = torch.cuda.get_device_name() if cuda else "CPU"
    print(f"{args.config}: {raw_model.num_params() / 1e6:.1f}M parameters, {B} rows x {T} positions; {name}, torch "
          f"{torch.__version__}, threads {torch.get_num_threads()}, compile={c['compile']}")
    print(run.schedule.describe(T))  # TST
    results = {}
    for step, label in ((c["max_steps"] - 1, "baseline (phase 2)"), (0, "TST phase 1")):
        record, memory = measure(run, step, args.steps)
        results[label] = {"ms": 1000 * record["dt"], "positions_per_sec": record["positions_per_sec"],
                          "data_tokens_per_sec": record["data_tokens_per_sec"], "mfu": record["mfu"],
                          "peak_memory_gib": memory}
        print(f"{label:>20}: {1000 * record['dt']:8.1f} ms/step  {record['positions_per_sec']:12,.0f} positions/s  "
              f"{record['data_tokens_per_sec']:12,.0f} data tokens/s  " + (
                  f"MFU {100 * record['mfu']:5.1f}%  peak memory {memory:6.1f} GiB" if cuda else "MFU n/a"))
    ratio = results["TST phase 1"]["ms"] / results["baseline (phase 2)"]["ms"]
    print(f"phase-1 step / baseline step: {ratio:.3f}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"config": args.config, "device": name, "batch_size": B, "n_layers": c["n_layers"],
                       "compile": c["compile"], "phases": results, "ratio": ratio}, f, indent=1)


if __name__ == "__main__":
    main()
