"""What a run reports: log.jsonl (a JSON record per step, what tools/compare.py reads), the console, and optionally
wandb or tensorboard. Rank 0 only; train.py calls write and show after each step, banner once at the start, and for
a run that ends early the line of diverged, stopped or lost (the last on any rank that survives a lost process).

A record holds the step, its loss (a bag loss in TST's phase 1: not comparable to next-token cross-entropy; val_loss
always is), the learning rate, the gradient norm, the totals so far (positions: the FLOPs; data_tokens: the text
read), throughput and MFU, and val_loss or a sample where the step had one.
"""

import importlib
import json
import re
import signal
from pathlib import Path

import cli
import config as settings
from cli import UserError

TRAIN = str(Path(__file__).with_name("train.py"))  # the script whose commands these lines give


def open_trackers(config):
    """(name, log(record), close) of wandb (wandb_project set) and tensorboard (tensorboard=True), none by default; one
    asked for but not installed is refused at start-up, before any step."""
    trackers = []
    if config["wandb_project"]:
        wandb = _tracker("wandb", "wandb_project is set", "leave wandb_project empty")
        wandb.init(project=config["wandb_project"], name=config["wandb_run_name"] or None, config=config,
                   dir=config["out_dir"])
        trackers.append(("wandb", lambda record: wandb.log(numbers(record), step=record["step"]), wandb.finish))
    if config["tensorboard"]:
        tensorboard = _tracker("torch.utils.tensorboard", "tensorboard=True", "set tensorboard=False", "tensorboard")
        writer = tensorboard.SummaryWriter(str(Path(config["out_dir"]) / "tensorboard"))
        log = lambda record: [writer.add_scalar(k, v, record["step"]) for k, v in numbers(record).items()]  # noqa
        trackers.append(("tensorboard", log, writer.close))
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
    """The record to log.jsonl and the trackers -> the line of each tracker that failed (wandb's servers gone, a full
    disk), which is dropped: train.py saves and stops at the end of the next step, as for a signal."""
    try:
        run.log.write(json.dumps(record) + "\n")
        run.log.flush()
    except OSError as e:
        raise UserError(f"writing {run.log.name} failed ({e}): free space, then --resume=True continues from the "
                        f"last checkpoint") from e
    failed = []
    for tracker in list(run.trackers):
        try:
            tracker[1](record)
        except Exception as e:  # whatever a tracker raises, the run saves and stops
            run.trackers.remove(tracker)
            failed.append(f"{tracker[0]} failed at step {record['step']} ({type(e).__name__}: {e}); the run stopped")
    if "sample" in record:
        print(f"sample at step {record['step']}: {record['sample']!r}")
    return failed


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
    if run.world > 1 and not config["global_batch_tokens"]:
        print(f"global_batch_tokens=0: the global batch is {run.world} processes x the one-process batch "
              f"({config['batch_size']} rows x {T} positions), so it grows with the process count; "
              f"global_batch_tokens=N keeps it at N positions per step, whatever the count")
    meta = run.loader.meta
    corpus = meta.get("corpus", {})  # its fingerprint, from prepare.py
    print(f"data: {config['data_dir']}, {meta['train_tokens']:,} train and {meta['val_tokens']:,} val tokens of "
          f"{meta['source']!r} ({corpus.get('documents', 0):,} documents, {corpus.get('bytes', 0):,} bytes, sha256 "
          f"{corpus.get('sha256', '?')[:16]}), tokenizer {meta['tokenizer']!r}")
    for line in settings.notes(config):  # settings that quietly train another run than they suggest (a baseline)
        print(line)
    print(run.schedule.describe(T))  # TST


# -----------------------------------------------------------------------------
# The lines of a run that ends early, with the command that continues it

def diverged(run, step, loss, grad_norm):
    """A NaN or infinite loss or gradient: the command that branches from the last good checkpoint with a lower
    learning rate, or that starts again with one."""
    out_dir, lower = Path(run.config["out_dir"]), f"--lr={run.config['lr'] / 4:g}"
    if (out_dir / "ckpt.pt").exists():
        last = (out_dir / "ckpt.pt").resolve()
        branch = cli.command(TRAIN, run.argv, f"--init_from={last}", lower, f"--out_dir={out_dir}_lr", "--resume=False")
        advice = f"the last checkpoint ({last.name}) is from before it: branch from it with a lower lr: {branch}"
    else:
        advice = f"no checkpoint was written yet: start again with a lower lr: {cli.command(TRAIN, run.argv, lower)}"
    return f"step {step}: loss {loss}, grad norm {grad_norm}: the run diverged and stopped before the update; {advice}"


def stopped(run, done, reason, path):
    """A run stopped after step done - 1, saved at `path`, by a signal (its number; 0: another rank's) or by a
    tracker's failure (its line, from write)."""
    why = reason if isinstance(reason, str) else "stopped by " + (signal.Signals(reason).name if reason else
                                                                   "a signal on another rank")
    N = run.config["max_steps"]
    then = (f"continue with: {cli.command(TRAIN, run.argv, '--resume=True')}" if done < N else
            f"all {N} steps are done; the held-out loss: python eval.py --ckpt {path}")
    return f"{why} after step {done - 1}: saved {path}; {then}"


def lost(run, step, error):
    """A survivor's line when another process of a torchrun job died (gloo's error in a collective): which one (of
    two; of more, another), and the newest checkpoint to continue from."""
    who = f"rank {1 - run.rank} of 2" if run.world == 2 else f"another rank of {run.world}"
    cause = re.sub(r"^\[[^]]*\] ", "", str(error).strip().splitlines()[0]).split(". ")[0]
    newest = Path(run.config["out_dir"]) / "ckpt.pt"
    if newest.exists():
        then = (f"the newest checkpoint is {newest.resolve()}; continue from it with: "
                f"{cli.command(TRAIN, run.argv, '--resume=True')}")
    else:
        then = f"no checkpoint was written yet; start again with: {cli.command(TRAIN, run.argv)}"
    return f"{who} was lost during step {step} ({cause}); rank {run.rank} stopped without saving step {step}: {then}"
