"""What a run reports: log.jsonl (a JSON record per step, what tools/compare.py reads), the console, and optionally
wandb or tensorboard. Rank 0 only; train.py calls write and show after each step, banner once at the start.

A record holds the step, its loss (a bag loss in TST's phase 1: not comparable to next-token cross-entropy; val_loss
always is), the learning rate, the gradient norm, the totals so far (positions: the FLOPs; data_tokens: the text
read), throughput and MFU, and val_loss or a sample where the step had one.
"""

import importlib
import json
from pathlib import Path

from cli import UserError


def open_trackers(config):
    """(log(record), close) pairs: wandb (wandb_project set) and tensorboard (tensorboard=True), none by default; one
    asked for but not installed is refused at start-up, before any step."""
    trackers = []
    if config["wandb_project"]:
        wandb = _tracker("wandb", "wandb_project is set", "leave wandb_project empty")
        wandb.init(project=config["wandb_project"], name=config["wandb_run_name"] or None, config=config,
                   dir=config["out_dir"])
        trackers.append((lambda record: wandb.log(numbers(record), step=record["step"]), wandb.finish))
    if config["tensorboard"]:
        tensorboard = _tracker("torch.utils.tensorboard", "tensorboard=True", "set tensorboard=False", "tensorboard")
        writer = tensorboard.SummaryWriter(str(Path(config["out_dir"]) / "tensorboard"))
        log = lambda record: [writer.add_scalar(k, v, record["step"]) for k, v in numbers(record).items()]  # noqa
        trackers.append((log, writer.close))
    return trackers


def _tracker(module, why, instead, package=None):
    try:
        return importlib.import_module(module)
    except ImportError:
        raise UserError(f"{why} but {package or module} is not installed: pip install {package or module}, or "
                        f"{instead}") from None


def numbers(record):
    return {k: v for k, v in record.items() if isinstance(v, (int, float)) and not isinstance(v, bool) and k != "step"}


def write(run, record):
    try:
        run.log.write(json.dumps(record) + "\n")
        run.log.flush()
    except OSError as e:
        raise UserError(f"writing {run.log.name} failed ({e}): free space, then --resume=True continues from the "
                        f"last checkpoint") from e
    for log, _ in run.trackers:
        log(record)
    if "sample" in record:
        print(f"sample at step {record['step']}: {record['sample']!r}")


def show(run, record, elapsed, steps_done_here):
    """step/total | stage | loss | val | lr | grad | throughput | MFU | ms | elapsed, ETA (from this process's pace)."""
    N, step = run.config["max_steps"], record["step"]
    parts = [f"step {step:{len(str(N))}d}/{N}", f"loss {record['loss']:.4f}"]
    parts.insert(1, run.schedule.label(step))  # TST: which stage (nothing for a baseline)
    if "val_loss" in record:
        parts.append(f"val {record['val_loss']:.4f}")
    parts += [f"lr {record['lr']:.2e}", f"grad {record['grad_norm']:.2f}"]
    if "aux_loss" in record:
        parts.append(f"aux {record['aux_loss']:.4f}, load {record['expert_load_min']:.2f}-"
                     f"{record['expert_load_max']:.2f}")
    parts.append(f"{record['positions_per_sec']:,.0f} pos/s, {record['data_tokens_per_sec']:,.0f} data tok/s")
    if record["mfu"] is not None:
        parts.append(f"mfu {100 * record['mfu']:.1f}%")
    eta = elapsed / steps_done_here * (N - step - 1)
    parts += [f"{1000 * record['dt']:.0f} ms", f"{clock(elapsed)} elapsed, ETA {clock(eta)}"]
    print(" | ".join(p for p in parts if p), flush=True)


def clock(seconds):
    minutes, seconds = divmod(round(seconds), 60)
    return f"{minutes // 60}:{minutes % 60:02d}:{seconds:02d}" if minutes >= 60 else f"{minutes}:{seconds:02d}"


def banner(run):
    config, T, model = run.config, run.config["seq_len"], run.raw_model
    n, active = model.num_params(), model.num_params(active=True)
    parallel = "FSDP2" if config["fsdp"] else "DDP" if run.world > 1 else "one process"
    print(json.dumps(config))
    print(f"model: {n / 1e6:.1f}M parameters ({model.num_params(embedding=False) / 1e6:.1f}M non-embedding"
          + (f", {active / 1e6:.1f}M active" if active != n else "") + f"), {run.flops_per_position / 1e6:.1f} MFLOP "
          f"per position; {parallel}, {run.world} process(es) on {run.device.type}, {config['dtype']}")
    print(f"global batch: {run.rows_per_step} rows x {T} positions = {run.rows_per_step * T:,} positions per step "
          f"({run.world} process(es) x {run.grad_accum} micro-step(s) x {config['batch_size']} rows); validation: "
          f"{len(run.val_rows)} rows = {len(run.val_rows) * T:,} positions spread over the val split")
    print(run.schedule.describe(T))  # TST
