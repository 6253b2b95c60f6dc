"""What a run will cost, from its settings alone: offline, in seconds (the model is built on the meta device).

    python tools/plan.py config/270m_tst.py                     # one process
    python tools/plan.py config/270m_tst.py --processes=8       # as torchrun --nproc_per_node=8 would run it
    python tools/plan.py config/10b_a1b_tst.py --processes=64 --batch_size=4   # --key=value as train.py takes them

Prints parameters, FLOPs per position and per step, positions and data tokens per stage, what the data folder must
hold (or how many epochs of it the run reads), and an estimate of each device's memory. Writes nothing.
"""

import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import cli  # noqa: E402
import config as settings  # noqa: E402
import data  # noqa: E402
import tst  # noqa: E402  # TST
from cli import UserError  # noqa: E402
from model import HEAD_CHUNK_LOGITS, ModelConfig, Transformer  # noqa: E402


def main(argv):
    processes = [a for a in argv if a.startswith("--processes")]
    world = 1
    for flag in processes:
        count = flag.partition("=")[2]
        if not count.isdigit() or int(count) < 1:
            raise UserError(f"{flag}: write --processes=N, N >= 1 (the processes torchrun would start)")
        world = int(count)
    plan(settings.load([a for a in argv if a not in processes]), world)


def plan(config, world):
    """Print parameters, FLOPs, positions and data tokens per stage, what the data folder must hold, and an estimate
    of each device's memory for `world` processes."""
    GB = 1e9
    meta = data.load_meta(config["data_dir"]) if (Path(config["data_dir"]) / "meta.json").exists() else None
    if config["vocab_size"] == 0:
        config["vocab_size"] = meta["vocab_size"] if meta else data.get_tokenizer(config["tokenizer"]).n_vocab
    settings.check(config, world)
    cfg = ModelConfig(**{k: config[k] for k in settings.MODEL_KEYS})
    with torch.device("meta"):
        model = Transformer(cfg)  # what train.py builds, the combiner of bags included
    n, active, T, B = model.num_params(), model.num_params(active=True), config["seq_len"], config["batch_size"]
    grad_accum = max(1, config["global_batch_tokens"] // (B * T * world))
    rows = B * grad_accum * world
    per_position = model.flops_per_position(T)
    print(f"model: {n:,} parameters ({model.num_params(embedding=False):,} non-embedding"
          + (f", {active:,} active per position" if active != n else "") + f"); {per_position / 1e9:.3f} GFLOP per "
          f"position at T={T}, {per_position * rows * T:.3e} FLOP per step")
    print(f"batch: {rows:,} rows x {T} positions = {rows * T:,} positions per step ({world} process(es) x {B} rows x "
          f"{grad_accum} micro-step(s))")
    N = config["max_steps"]
    ends = {N: (T, "next-token training")}  # the step each stage ends before: (data tokens a row reads, what)
    ends.update({st.end: (st.data_tokens_per_row(T), st.name) for st in tst.Schedule(config, meta).stages})  # TST
    total_data, start = 0, 0
    for end, (row_tokens, what) in sorted(ends.items()):
        steps = end - start
        total_data += steps * rows * row_tokens
        print(f"  steps {start:,}-{end - 1:,} ({steps:,}, {what}): {steps * rows * T:,} positions, "
              f"{steps * rows * row_tokens:,} data tokens")
        start = end
    positions = config["max_steps"] * rows * T
    print(f"total: {config['max_steps']:,} steps, {positions:,} positions, {total_data:,} data tokens, "
          f"{per_position * positions:.3e} FLOP")
    if meta:
        print(f"data: {config['data_dir']} holds {meta['train_tokens']:,} train tokens: the run reads "
              f"{total_data / meta['train_tokens']:.2f} epochs of it")
    else:
        print(f"data: {config['data_dir']} is missing; for one pass it must hold {total_data:,} train tokens "
              f"({total_data / GB:.1f}B): " + data.prepare_command({"source": config["data_source"], "tokenizer":
              config["tokenizer"], "max_tokens": f"{total_data:.3g}"}, config["data_dir"]))
    # as train.py would run it here: device auto is CUDA where there is a GPU; --device=cuda plans a GPU run anywhere
    on_cpu = config["dtype"] == "float32" or config["device"] == "cpu" or (config["device"] == "auto" and not
                                                                            torch.cuda.is_available())
    plan_memory(config, cfg, n, world, B * T, 4 if on_cpu else 2)


def plan_memory(config, cfg, n, world, positions, dtype_bytes):
    GB = 1e9
    if config["fsdp"]:  # sharded float32 weights, gradients and moments; the unsharded bf16 blocks in flight
        block = (n - cfg.vocab_size * cfg.dim * (1 if cfg.tie_embeddings else 2)) / cfg.n_layers
        root = cfg.vocab_size * cfg.dim * (1 if cfg.tie_embeddings else 2)
        states = {"weights": 4 * n / world, "gradients": 4 * n / world, "AdamW moments": 8 * n / world,
                  "unsharded bf16 parameters in flight (root + 2 blocks)": 2 * (root + 2 * block)}
        how = f"FSDP2 over {world} processes"
    else:  # DDP keeps a second copy of the gradients in its all-reduce buckets
        states = {"weights": 4 * n, "gradients": 4 * n, "AdamW moments": 8 * n}
        if world > 1:
            states["DDP buckets"] = 4 * n
        how = f"DDP over {world} processes" if world > 1 else "one process"
    activations = cfg.activation_bytes(positions, dtype_bytes)
    chunk = min(HEAD_CHUNK_LOGITS, positions * cfg.vocab_size) * 4 * 4 + 4 * cfg.vocab_size * cfg.dim
    full_logits = positions * cfg.vocab_size * (dtype_bytes + 3 * 4)
    print(f"memory per device ({how}, {'bf16' if dtype_bytes == 2 else 'fp32'} compute): "
          + ", ".join(f"{k} {v / GB:.2f} GB" for k, v in states.items()))
    print(f"  activations of a micro-batch of {config['batch_size']} x {config['seq_len']} positions: ~"
          f"{activations / GB:.2f} GB (eager; compile saves less); the loss, a chunk at a time: ~{chunk / GB:.2f} GB "
          f"(whole logits would take ~{full_logits / GB:.1f} GB)")
    print(f"  total: ~{(sum(states.values()) + activations + chunk) / GB:.1f} GB per device")


if __name__ == "__main__":
    cli.run(main)
