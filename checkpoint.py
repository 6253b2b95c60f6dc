"""Checkpoints of a run's out_dir: written atomically, verified before they are read, one live run per folder.

A checkpoint is out_dir/ckpt_{step:07d}.pt: one file (torch.save) written by rank 0, or under FSDP a folder of that
name in which every rank writes its shards (torch.distributed.checkpoint) beside rank 0's train_state.pt. It is
written under a .tmp name and renamed when complete, so a killed run never leaves a half-written one; out_dir/ckpt.pt
links to the newest. Every byte is covered by a checksum, checked before anything is loaded: torch.save's zip stores
a CRC-32 of each entry, and an FSDP folder lists the CRC-32 of each of its files in checksums.json.

What a checkpoint holds: model and optimizer state, and the train state (config, model_config, step, loader position,
totals, every rank's RNG states). load_model is what eval.py, sample.py and the exporter use.
"""

import errno
import fcntl
import json
import os
import shlex
import shutil
import socket
import zipfile
import zlib
from pathlib import Path

import torch
import torch.distributed as dist

import data
from cli import UserError
from model import ModelConfig, Transformer

TRAIN_STATE_KEYS = ("config", "model_config", "step", "loader", "totals", "rng")
CHECKSUMS = "checksums.json"  # in an FSDP folder: {file name: CRC-32}


def checkpoint_path(out_dir, step):
    return Path(out_dir) / f"ckpt_{step:07d}.pt"


def _master():
    return not dist.is_initialized() or dist.get_rank() == 0


def _crc32(path):
    crc = 0
    with open(path, "rb") as f:
        while chunk := f.read(1 << 24):
            crc = zlib.crc32(chunk, crc)
    return crc


def _fsync(path):
    with open(path, "rb") as f:
        os.fsync(f.fileno())


# -----------------------------------------------------------------------------
# Saving

def save(out_dir, step, model, optimizer, train_state, *, fsdp=False, keep_last=2, keep_steps=()):
    """Write checkpoint `step` (every rank calls this under torch.distributed), point ckpt.pt at it, and delete all
    but the last keep_last checkpoints and those of keep_steps. A failed write (a full disk) removes what it wrote on
    every rank and raises a UserError naming the file, the step and the cause. Returns the checkpoint's path."""
    out = Path(out_dir)
    path = checkpoint_path(out, step)
    tmp = path.with_suffix(".tmp")
    error = None
    try:
        if fsdp:
            _save_sharded(tmp, model, optimizer, train_state)
        elif _master():
            if hasattr(torch.serialization, "config"):  # the zip's CRC-32s are what load verifies (the default)
                torch.serialization.config.save.compute_crc32 = True
            torch.save({"model": model.state_dict(), "optimizer": optimizer.state_dict(), **train_state}, tmp)
            _fsync(tmp)
    except (OSError, RuntimeError) as e:  # a full disk: torch.save reports it as a RuntimeError
        error = e
    except BaseException as e:  # torch.distributed.checkpoint's CheckpointException derives from BaseException
        if type(e).__name__ != "CheckpointException":
            raise
        error = e
    if dist.is_initialized():  # every rank learns whether any rank failed, and so stops or goes on with the others
        failed = torch.tensor([error is not None], dtype=torch.int32)
        if dist.get_backend() == "nccl":
            failed = failed.cuda()
        dist.all_reduce(failed)
        failed = bool(failed.item())
    else:
        failed = error is not None
    if failed:
        shutil.rmtree(tmp, ignore_errors=True) if tmp.is_dir() else tmp.unlink(missing_ok=True)
        previous = (out / "ckpt.pt").resolve() if (out / "ckpt.pt").exists() else None
        kept = (f"the previous checkpoint {previous.name} is intact: free space, then --resume=True continues from it"
                if previous else "this run has no checkpoint yet: free space and start it again")
        raise UserError(f"saving checkpoint {path} (step {step}) failed: {_cause(error)}; {kept}") from error
    if _master():
        if path.is_dir():  # a boundary checkpoint saved again by a run resumed from it
            shutil.rmtree(path)
        os.replace(tmp, path)
        latest, link = out / "ckpt.pt", out / "ckpt.lnk"
        link.unlink(missing_ok=True)
        link.symlink_to(path.name)
        os.replace(link, latest)
        keep = {checkpoint_path(out, s).name for s in keep_steps}
        for old in sorted(out.glob("ckpt_*.pt"))[:-keep_last]:
            if old.name not in keep:
                shutil.rmtree(old) if old.is_dir() else old.unlink()
    if dist.is_initialized():
        dist.barrier()
    return path


def _save_sharded(tmp, model, optimizer, train_state):
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict
    model_state, optimizer_state = get_state_dict(model, optimizer)
    if _master():
        shutil.rmtree(tmp, ignore_errors=True)
    dist.barrier()
    dcp.save({"model": model_state, "optimizer": optimizer_state}, checkpoint_id=tmp)
    # each rank checksums the shard files it wrote (torch.distributed.checkpoint names them __{rank}_{n}.distcp),
    # rank 0 the rest: a 10B model's folder is checksummed in parallel
    if _master():
        torch.save(train_state, tmp / "train_state.pt")
    dist.barrier()
    rank = dist.get_rank()
    mine = {f.name: _crc32(f) for f in sorted(tmp.iterdir())
            if f.name.startswith(f"__{rank}_") or (rank == 0 and not f.name.startswith("__"))}
    for f in mine:
        _fsync(tmp / f)
    gathered = [None] * dist.get_world_size()
    dist.all_gather_object(gathered, mine)
    if _master():
        checksums = {name: crc for part in gathered for name, crc in part.items()}
        (tmp / CHECKSUMS).write_text(json.dumps(checksums, indent=1, sort_keys=True))
        _fsync(tmp / CHECKSUMS)


def _cause(error):
    """A full disk in a word, whatever layer reported it; otherwise the error's first line."""
    if error is None:
        return "another rank's write failed"
    text = str(error)
    for e in [error, error.__cause__, error.__context__, *getattr(error, "failures", {}).values()]:
        e = e[0] if isinstance(e, tuple) else e  # CheckpointException.failures: {rank: (exception, traceback)}
        if isinstance(e, OSError) and e.errno == errno.ENOSPC or "No space left" in str(e):
            return "no space left on device"
    return text.splitlines()[0] if text else type(error).__name__


# -----------------------------------------------------------------------------
# Loading

def newest(out_dir):
    """The checkpoint out_dir/ckpt.pt links to; if that link is missing, a UserError naming the newest one."""
    latest = Path(out_dir) / "ckpt.pt"
    if latest.exists():
        return latest.resolve()
    found = sorted(Path(out_dir).glob("ckpt_*.pt"))
    if found:
        raise UserError(f"{latest} is missing but {out_dir} holds {', '.join(f.name for f in found)}: point it at the "
                        f"newest, {shlex.join(['ln', '-sfn', found[-1].name, str(latest)])}, then resume")
    raise UserError(f"no checkpoint in {out_dir} ({latest} does not exist): nothing to resume")


def verify(path):
    """Check a checkpoint's checksums before it is read; a UserError names a damaged file and the checkpoints beside
    it to fall back to. Under torch.distributed the ranks share the work."""
    path = Path(path).resolve()  # RUN/ckpt.pt: name the checkpoint it links to, and the ones beside it
    bad = None
    if path.is_dir():
        listed = path / CHECKSUMS
        if not listed.is_file():
            bad = f"{listed} is missing"
        else:
            try:
                checksums = json.loads(listed.read_text())
            except json.JSONDecodeError:
                checksums, bad = {}, f"{listed} is not JSON"
            names = sorted(checksums)
            rank, world = (dist.get_rank(), dist.get_world_size()) if dist.is_initialized() else (0, 1)
            for name in names[rank::world]:
                f = path / name
                if not f.is_file():
                    bad = f"{f} is missing"
                elif _crc32(f) != checksums[name]:
                    bad = f"{f} does not match its checksum"
            if dist.is_initialized():
                found = [None] * world
                dist.all_gather_object(found, bad)
                bad = next((b for b in found if b), None)
    else:
        bad = _zip_damage(path)
    if bad:
        older = sorted(p for p in path.parent.glob("ckpt_*.pt") if p.name < path.name)[::-1]
        fallback = "no older checkpoint is left in that folder"
        if older:
            relink = shlex.join(["ln", "-sfn", older[0].name, str(path.parent / "ckpt.pt")])
            fallback = (f"fall back to an older one ({', '.join(p.name for p in older)}), e.g. {relink}, then "
                        f"--resume=True, or branch from it with --init_from={older[0]}")
        raise UserError(f"checkpoint {path} is damaged ({bad}): {fallback}")


def _zip_damage(path):
    """What is wrong with a torch.save file, or None: its zip directory and every entry's CRC-32 are checked."""
    if not path.is_file():
        return "no such file"
    try:
        with zipfile.ZipFile(path) as z:
            name = z.testzip()  # reads every entry and checks its CRC-32
    except (zipfile.BadZipFile, EOFError, OSError, ValueError) as e:
        return f"not a complete torch.save file: {e}"
    return f"entry {name} does not match its CRC-32" if name else None


def read_train_state(path):
    """The train state of a verified checkpoint (a dict with TRAIN_STATE_KEYS; a file's also holds model and
    optimizer)."""
    path = Path(path)
    verify(path)
    state_file = path / "train_state.pt" if path.is_dir() else path
    try:
        state = torch.load(state_file, map_location="cpu", weights_only=False)  # ours: configs and RNG states
    except Exception as e:  # a zip that is not a torch checkpoint: torch raises RuntimeError, pickle others
        raise UserError(f"{state_file} is not a checkpoint written by train.py ({type(e).__name__}: "
                        f"{str(e).splitlines()[0] if str(e) else ''})") from None
    missing = [k for k in TRAIN_STATE_KEYS + (() if path.is_dir() else ("model", "optimizer"))
               if not isinstance(state, dict) or k not in state]
    if missing:
        raise UserError(f"{state_file} is not a checkpoint written by train.py: it lacks {missing}")
    return state


def load_into(path, state, model, optimizer=None):
    """Fill model (and optimizer) in place from checkpoint `path` whose train state is `state` (read_train_state).
    An FSDP folder is read into whatever this process holds: the same sharding, another one, or one whole model."""
    path = Path(path)
    if path.is_dir():
        import torch.distributed.checkpoint as dcp
        if optimizer is None:
            shards = {"model": model.state_dict()}
            dcp.load(shards, checkpoint_id=path)  # fills the tensors in place
            model.load_state_dict(shards["model"])
            return
        from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict
        model_state, optimizer_state = get_state_dict(model, optimizer)
        shards = {"model": model_state, "optimizer": optimizer_state}
        dcp.load(shards, checkpoint_id=path)
        set_state_dict(model, optimizer, model_state_dict=shards["model"], optim_state_dict=shards["optimizer"])
        return
    if any(hasattr(p, "device_mesh") for p in model.parameters()):  # whole weights into an FSDP2-sharded model
        from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict
        set_model_state_dict(model, state["model"], options=StateDictOptions(full_state_dict=True))
    else:
        model.load_state_dict(state["model"])
    if optimizer is not None:
        optimizer.load_state_dict(state["optimizer"])


def load_model(path, device="cpu"):
    """A train.py checkpoint (file or FSDP folder) -> (the model in eval mode on `device`, its train state)."""
    path = Path(path)
    if not path.exists():
        raise UserError(f"no checkpoint at {path}: pass a ckpt_*.pt file or folder (or RUN/ckpt.pt) written by "
                        f"train.py")
    state = read_train_state(path)
    unknown = sorted(set(state["model_config"]) - set(ModelConfig.__dataclass_fields__))
    if unknown:
        raise UserError(f"{path} was saved by another version of model.py: its model_config has {unknown}, which "
                        f"this ModelConfig lacks")
    model = Transformer(ModelConfig(**state["model_config"]))
    load_into(path, state, model)
    return model.to(device).eval(), state


def run_tokenizer(config):
    """The tokenizer a run trained with, as its config (a checkpoint's) names it."""
    name = config["tokenizer"]
    if name.startswith("llama3:") and not os.path.isfile(name.removeprefix("llama3:")):
        raise UserError(f"the checkpoint's tokenizer {name!r}: no such file seen from {os.getcwd()}; run from the "
                        f"folder training ran in")
    return data.get_tokenizer(name)


# -----------------------------------------------------------------------------
# One live run per out_dir

def lock(out_dir):
    """Hold an exclusive lock on out_dir for as long as this process lives (the kernel drops it when the process
    ends, however it ends, so a dead run's lock never blocks). Returns the open lock file; a UserError if a live run
    holds it."""
    path = Path(out_dir) / "run.lock"
    f = open(path, "a+")
    try:
        fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        f.seek(0)
        holder = f.read().strip() or "another process"
        f.close()
        raise UserError(f"out_dir={out_dir} is in use by a live run ({holder}): wait for it to end, stop it, or give "
                        f"this run another out_dir") from None
    f.seek(0)
    f.truncate()
    f.write(f"pid {os.getpid()} on {socket.gethostname()}\n")
    f.flush()
    return f
