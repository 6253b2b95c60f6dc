"""A run's folder beyond the checkpoint files of checkpoint.py: one live run per out_dir (a lock), where a run starts
(fresh, resumed from its newest checkpoint, or branched from another run's with init_from), and what a run saves
beside its weights to continue exactly: the step, the loader's position, the totals, every rank's RNG states, and a
log.jsonl cut back to the checkpoint's step.
"""

import errno
import fcntl
import json
import os
import random
import shlex
import socket
from pathlib import Path

import torch
import torch.distributed as dist

import data
from checkpoint import CHECKSUMS, load_into, newest, read_train_state, save
from cli import UserError


# -----------------------------------------------------------------------------
# One live run per out_dir

class _Lock:
    """out_dir's lock (see lock): held until close() or the end of this process."""

    def __init__(self, fds):
        self.fds = fds

    def close(self):
        while self.fds:
            os.close(self.fds.pop())

    @property
    def closed(self):
        return not self.fds


def _flock(fd):
    """Lock an open file or folder: True; False if another open file (a live run) holds it; None where the file
    system cannot lock it (a folder on NFS)."""
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        return True
    except BlockingIOError:
        return False
    except OSError as e:
        if e.errno in (errno.EBADF, errno.ENOLCK, errno.EINVAL, errno.EOPNOTSUPP, errno.ENOSYS):
            return None
        raise


def _lock_file_problem(path):
    """Why out_dir/run.lock cannot be the lock file (a folder, a symlink, another kind of file), or None."""
    if path.is_symlink():
        dangling = "" if path.exists() else ", which does not exist"
        return (f"{path} is a symlink (to {os.readlink(path)}{dangling}), not the lock file of a run: remove it "
                f"({shlex.join(['rm', str(path)])}) and start the run again")
    if path.is_dir():
        return (f"{path} is a folder, not the lock file of a run: remove it ({shlex.join(['rm', '-r', str(path)])}) "
                f"and start the run again")
    if path.exists() and not path.is_file():
        return (f"{path} is not a file, not the lock file of a run: remove it ({shlex.join(['rm', str(path)])}) and "
                f"start the run again")
    return None


def lock(out_dir):
    """Hold an exclusive lock on out_dir for as long as this process lives (the kernel drops it when the process
    ends, however it ends, so a dead run's lock never blocks). The lock is on the folder itself, so that deleting
    out_dir/run.lock, which names the run that holds it, lets no second run in; and on run.lock too (where a file
    system cannot lock a folder, NFS, on run.lock alone). Returns the lock (close() frees out_dir); a UserError if a
    live run holds it, or if run.lock is not a file (a folder, a symlink)."""
    out, path = Path(out_dir), Path(out_dir) / "run.lock"

    def refuse():
        try:
            with open(os.open(path, os.O_RDONLY | os.O_NOFOLLOW)) as f:
                holder = f.read(200).strip()
        except (OSError, ValueError):
            holder = ""
        raise UserError(f"out_dir={out_dir} is in use by a live run ({holder or 'another process'}): wait for it to "
                        f"end, stop it, or give this run another out_dir")

    fds = []
    try:
        fds.append(os.open(out, os.O_RDONLY | os.O_DIRECTORY))
        folder = _flock(fds[0])
        if folder is False:
            refuse()
        for _ in range(100):  # until the run.lock locked is the one at its path (another process may replace it)
            if problem := _lock_file_problem(path):
                raise UserError(problem)
            fds.append(os.open(path, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW, 0o644))
            held = _flock(fds[-1])
            if held is False:  # a live run of an earlier version of this code, which locked run.lock alone
                refuse()
            if held is None and folder is None:
                raise UserError(f"out_dir={out_dir} is on a file system that cannot lock files: give this run an "
                                f"out_dir on another file system")
            try:
                if os.path.samestat(os.fstat(fds[-1]), os.stat(path, follow_symlinks=False)):
                    break
            except FileNotFoundError:
                pass
            os.close(fds.pop())
        else:
            raise UserError(f"{path} keeps being replaced by another process: stop it, or give this run another "
                            f"out_dir")
        os.ftruncate(fds[-1], 0)
        os.write(fds[-1], f"pid {os.getpid()} on {socket.gethostname()}\n".encode())
        return _Lock(fds)
    except OSError as e:
        _Lock(fds).close()
        raise UserError(f"out_dir={out_dir} cannot be locked ({e.strerror}: {e.filename}): "
                        f"{_lock_file_problem(path) or 'choose another out_dir'}") from None
    except BaseException:
        _Lock(fds).close()
        raise


# -----------------------------------------------------------------------------
# Runs: where a run starts (fresh, resumed or branched) and what it saves beyond weights: step, loader position,
# totals, RNG states and the settings that give them their meaning

def all_agree(ok, device):
    """Whether `ok` holds on every rank (one process: whether it holds), so that all ranks stop together."""
    if not dist.is_initialized():
        return ok
    flag = torch.tensor([float(not ok)], device=device)
    dist.all_reduce(flag)
    return flag.item() == 0


def save_run(run, step, keep_steps=()):
    """Checkpoint `step` of a train.py Run: weights, optimizer and the train state, every rank's RNG included."""
    rngs = [None] * run.world
    if dist.is_initialized():
        dist.all_gather_object(rngs, rng_state())
    else:
        rngs = [rng_state()]
    # beside what a resume restores, what it checks: the processes, and the data folder's shards (by name and size)
    train_state = {"model_config": run.raw_model.cfg.to_dict(), "config": run.config, "step": step,
                   "loader": run.loader.state_dict(), "totals": dict(run.totals), "rng": rngs, "world": run.world,
                   "shards": shard_list(run.loader.data_dir)}
    return save(run.config["out_dir"], step, run.raw_model, run.optimizer, train_state, fsdp=run.config["fsdp"],
                keep_last=run.config["keep_last"], keep_steps=keep_steps)


def start_run(config, model, optimizer, loader, rank):
    """Where a run starts -> (step, totals): from scratch; resumed from out_dir's newest checkpoint (resume=True);
    or branched from another run's (init_from). Rank 0 writes config.json and starts log.jsonl afresh or, resuming,
    keeps its lines of the steps before the checkpoint's."""
    import config as settings  # here: config.py imports model and tst, which a reader of checkpoints needs not
    out_dir, step, totals = Path(config["out_dir"]), 0, {"positions": 0, "data_tokens": 0, "flops": 0}
    if config["resume"]:
        step, totals = restore(newest(out_dir), config, model, optimizer, loader, rank, settings, resume=True)
    elif any(out_dir.glob("ckpt_*.pt")):
        raise UserError(f"out_dir={out_dir} holds another run's checkpoints: continue it with --resume=True, or give "
                        f"this run a new out_dir")
    elif config["init_from"]:
        step, totals = restore(init_checkpoint(config["init_from"]), config, model, optimizer, loader, rank, settings)
    if rank == 0:
        (out_dir / "config.json").write_text(json.dumps(config, indent=2) + "\n")
        if config["resume"]:
            truncate_log(out_dir / "log.jsonl", step)
        else:
            (out_dir / "log.jsonl").unlink(missing_ok=True)  # a run that died before its first checkpoint
    return step, totals


INIT_FROM = "init_from takes a checkpoint: a ckpt_*.pt file or folder, a run's ckpt.pt, or a run's out_dir"


def init_checkpoint(init_from):
    """The checkpoint init_from names (of a run's out_dir: its newest); a UserError that says what was given instead
    for a path to nothing, a folder that holds no checkpoint, or a file that is none (a run's log.jsonl)."""
    source = Path(init_from)
    if not source.exists() and not source.is_symlink():  # a link to nothing: the checkpoint reader names it
        where = "" if source.is_absolute() else f" (from {os.getcwd()})"
        raise UserError(f"init_from={init_from}: no such file or folder{where}; {INIT_FROM}")
    if source.is_dir():
        names = sorted(p.name for p in source.iterdir())
        if any(n == "ckpt.pt" or n.startswith("ckpt_") for n in names):  # a run's out_dir
            return newest(source)
        if {"log.jsonl", "config.json"} & set(names):
            raise UserError(f"init_from={init_from} is a run's out_dir without a checkpoint yet (train.py saves one "
                            f"every ckpt_interval steps); {INIT_FROM}")
        if not {CHECKSUMS, "train_state.pt", ".metadata"} & set(names):  # none of a sharded checkpoint's files
            held = ", ".join(names[:3]) + (f" and {len(names) - 3} more" if len(names) > 3 else "")
            what = f"a folder that holds no checkpoint ({held})" if names else "an empty folder"
            raise UserError(f"init_from={init_from} is {what}; {INIT_FROM}")
    elif source.exists() and not source.name.endswith(".pt") and not _starts_as_zip(source):
        in_run = any((source.parent / n).exists() for n in ("ckpt.pt", "log.jsonl", "config.json"))
        run = f"; its run's out_dir is --init_from={source.parent}" if in_run else ""
        raise UserError(f"init_from={init_from} is a file that is not a checkpoint{run}; {INIT_FROM}")
    return source


def _starts_as_zip(path):
    with open(path, "rb") as f:
        return f.read(4) == b"PK\x03\x04"  # torch.save writes a zip


def shard_list(data_dir):
    """[split, file, tokens] of each shard of a prepared data folder: what a resumed run must find again to read the
    rows the original would have read."""
    return [[s["split"], s["file"], s["tokens"]] for s in data.load_meta(data_dir)["shards"]]


def restore(path, config, model, optimizer, loader, rank, settings, resume=False):
    """Continue from checkpoint `path` -> (step, totals): this run (resume: every setting that changes what it
    computes must match) or a new run branched from another's (init_from: the model's shape and the tokenizer must
    match, and the settings that differ are printed). Restores weights, optimizer moments, loader position, RNG states
    and totals, so a branch with unchanged settings repeats the original's later steps exactly; init_weights_only:
    the weights alone, at step 0."""
    state = read_train_state(path)
    old = {**settings.DEFAULTS, **state["config"]}  # a setting added since: the runs before it behaved as its default
    weights_only = not resume and config["init_weights_only"]
    fixed = (set(settings.DEFAULTS) - settings.RESUMABLE_KEYS) if resume else \
        settings.IDENTITY_KEYS + ["fsdp"] * (not weights_only)
    differing = {k: (old.get(k), config[k]) for k in sorted(fixed) if old.get(k) != config[k]}
    if differing:
        lines = "; ".join(f"{k}: checkpoint {a!r}, this run {b!r}" for k, (a, b) in differing.items())
        advice = ("resume with the checkpoint's settings, or branch a new run from it with --init_from" if resume
                  else "a branch keeps the model's shape and the tokenizer" + ("" if weights_only else
                       "; init_weights_only=True takes the weights alone"))
        raise UserError(f"checkpoint {path} was written by a run with other settings ({lines}): {advice}")
    if not weights_only:
        _check_data(path, state, loader, resume)
        _check_world(path, state, old, config, loader.world_size, rank, resume)
    load_into(path, state, model, None if weights_only else optimizer)
    if rank == 0 and not resume:
        changed = {k: (old.get(k), v) for k, v in config.items()
                   if old.get(k) != v and k not in ("out_dir", "resume", "init_from", "init_weights_only")}
        what = "its weights, at step 0" if weights_only else f"step {state['step']}: weights, optimizer, data, RNG"
        print(f"init_from {path}: {what}; settings changed: "
              + (", ".join(f"{k} {a!r} -> {b!r}" for k, (a, b) in changed.items()) or "none"))
    if weights_only:
        return 0, {"positions": 0, "data_tokens": 0, "flops": 0}
    try:
        loader.load_state_dict(state["loader"])
    except UserError as e:
        raise UserError(f"{e}" + ("" if resume else "; or take the weights alone: init_weights_only=True")) from None
    set_rng_state(state["rng"][rank] if rank < len(state["rng"]) else state["rng"][0])
    step = state["step"]
    if rank == 0 and resume:
        print(f"resumed from {Path(path).name} at step {step}")
    if rank == 0 and not resume and old["max_steps"] != config["max_steps"] and step < config["max_steps"]:
        print(f"max_steps {old['max_steps']} -> {config['max_steps']}: the learning-rate schedule (and every stage) is "
              f"computed over {config['max_steps']} steps, so step {step} runs at lr "
              f"{settings.lr_at(step, config):.3g}; the original's last step ran at "
              f"{settings.lr_at(old['max_steps'] - 1, old):.3g}; the decay now starts at step "
              f"{config['max_steps'] - round(config['decay_frac'] * config['max_steps'])}")
    return step, state["totals"]


def _check_data(path, state, loader, resume):
    """A UserError unless the data folder holds the shards the checkpoint's run read (by name and size; checkpoints
    from before this record have none to compare): a folder prepared again into other shards serves other rows."""
    now, then = shard_list(loader.data_dir), state.get("shards")
    if then is None or then == now:
        return
    changes = []
    for split in ("train", "val"):
        a, b = ([(f, n) for sp, f, n in shards if sp == split] for shards in (then, now))
        if a != b:
            i = next(i for i in range(max(len(a), len(b))) if a[i:i + 1] != b[i:i + 1])  # the first that differs
            changes.append(f"its {split} split was {_shards(a, i)} and is now {_shards(b, i)}")
    how = ("or start a new run from its weights with --init_from=" + str(path) + " --init_weights_only=True" if resume
           else "or take the weights alone: init_weights_only=True")
    raise UserError(f"data_dir={loader.data_dir} is not the data checkpoint {path} was trained on "
                    f"({'; '.join(changes)}): the run would not read the rows it would have read; prepare it again "
                    f"exactly as before (same source, tokenizer and shard sizes) or point data_dir at the original, "
                    f"{how}")


def _shards(shards, i):
    shard = f"shard {i}: {shards[i][0]}, {shards[i][1]:,}" if i < len(shards) else f"no shard {i}"
    return f"{len(shards)} shard{'s' * (len(shards) != 1)} of {sum(n for _, n in shards):,} tokens ({shard})"


def _check_world(path, state, old, config, world, rank, resume):
    """Another process count than the checkpoint's: a UserError where a resume would take another number of rows per
    step (the loader serves the rows in the same order under any process count), else one line (rank 0) on what
    changes."""
    then = state.get("world", len(state["rng"]))  # before it was recorded: one RNG state per process
    if then == world:
        return

    def rows(c, w):  # train.py's rows per step: gradient accumulation fills global_batch_tokens, if set
        return c["batch_size"] * w * max(1, c["global_batch_tokens"] // (c["batch_size"] * c["seq_len"] * w))
    before, now = rows(old, then), rows(config, world)
    if resume and before != now:
        tokens = before * config["seq_len"]  # a branch's global_batch_tokens that keeps the rows, where one can
        branch = (f", or branch from it with --init_from={path} --global_batch_tokens={tokens}"
                  if tokens % (config["batch_size"] * config["seq_len"] * world) == 0 else "")
        raise UserError(f"checkpoint {path} was written by {then} processes, this run has {world}: a step would take "
                        f"{now} rows instead of {before}; resume with {then} processes{branch} (global_batch_tokens "
                        f"keeps the rows per step under any process count; with it 0, each process adds batch_size "
                        f"rows)")
    if rank == 0:
        print(f"checkpoint {path} was written by {then} processes, this run has {world}: {now} rows per step "
              f"({'as before' if now == before else f'{before} before'}), read in the same order; each rank takes its "
              f"random state from the checkpoint where it has its own, else rank 0's")


def truncate_log(path, step):
    """Keep the log lines of steps before `step`: those after it are about to be redone, and a line torn by a crash
    (a full disk) is dropped."""
    kept = []
    for line in path.read_text().splitlines(keepends=True) if path.exists() else []:
        try:
            if line.endswith("\n") and json.loads(line)["step"] < step:
                kept.append(line)
        except json.JSONDecodeError:
            pass
    tmp = path.with_suffix(".tmp")
    tmp.write_text("".join(kept))
    os.replace(tmp, path)


def rng_state():
    return {"python": random.getstate(), "torch": torch.get_rng_state(),
            "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else []}


def set_rng_state(state):
    random.setstate(state["python"])
    torch.set_rng_state(state["torch"])
    if state["cuda"]:
        torch.cuda.set_rng_state_all(state["cuda"])


def claim_out_dir(out_dir, rank, device):
    """out_dir made, writable and locked by this run (rank 0) before any data or model is built; a folder held by a
    live run is refused on every rank, by name."""
    out_dir, problem, held = Path(out_dir), None, None
    if rank == 0:
        try:
            out_dir.mkdir(parents=True, exist_ok=True)
            if not os.access(out_dir, os.W_OK | os.X_OK):
                problem = f"out_dir={out_dir} is not writable: choose another out_dir"
            else:
                held = lock(out_dir)
        except OSError as e:  # a file in the way, a file above it, a read-only parent
            problem = f"out_dir={out_dir} cannot be made a folder ({e.strerror}: {e.filename}): choose another out_dir"
        except UserError as e:
            problem = str(e)
    if not all_agree(problem is None, device):
        raise UserError(problem or f"rank 0 could not claim out_dir={out_dir} (its message is above)")
    return held
