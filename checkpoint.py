"""Checkpoints of a run's out_dir: written atomically, verified before they are read (the run around them: resume.py).

A checkpoint is out_dir/ckpt_{step:07d}.pt: one file (torch.save) written by rank 0, or under FSDP a folder of that
name in which every rank writes its shards (torch.distributed.checkpoint) beside rank 0's train_state.pt. It is
written under a .tmp name and renamed when complete, so a killed run never leaves a half-written one; out_dir/ckpt.pt
links to the newest. Every byte is covered by a checksum, checked before anything is loaded: a file ends with the
CRC-32 of all its other bytes, in the zip's comment (which torch.load ignores), and an FSDP folder lists the CRC-32 of
each of its files, and of nothing else, in checksums.json. A damaged checkpoint is refused in one line that names the
other checkpoints of its folder to fall back to.

What a checkpoint holds: model and optimizer state, and the train state (config, model_config, step, loader position,
totals, every rank's RNG states). load_model is what eval.py, sample.py and the exporter use.
"""

import errno
import json
import os
import shlex
import shutil
import struct
import warnings
import zipfile
import zlib
from pathlib import Path

import torch
import torch.distributed as dist

import data
from cli import UserError
from model import ModelConfig, Transformer

TRAIN_STATE_KEYS = ("config", "model_config", "step", "loader", "totals", "rng")
CHECKSUMS = "checksums.json"  # in an FSDP folder: {file name: CRC-32}, every other file of the folder
SEAL = b" tst: CRC-32 of the bytes before: "  # a file's zip comment: SEAL, then that CRC-32 in 8 lowercase hex digits
END = b"PK\x05\x06"  # the signature of a zip's end-of-central-directory record (22 bytes, then the comment)


def checkpoint_path(out_dir, step):
    return Path(out_dir) / f"ckpt_{step:07d}.pt"


def _master():
    return not dist.is_initialized() or dist.get_rank() == 0


def _crc32(path, size=None):
    """The CRC-32 of a file's first `size` bytes (all of them: None)."""
    crc, left = 0, float("inf") if size is None else size
    with open(path, "rb") as f:
        while left > 0 and (chunk := f.read(int(min(1 << 24, left)))):
            crc, left = zlib.crc32(chunk, crc), left - len(chunk)
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
            if hasattr(torch.serialization, "config"):  # the zip's CRC-32s (the default): what zip tools check
                torch.serialization.config.save.compute_crc32 = True
            torch.save({"model": model.state_dict(), "optimizer": optimizer.state_dict(), **train_state}, tmp)
            _seal(tmp)
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
        cause = _cause(error, out)  # before the partial checkpoint is removed: a full disk is still full
        shutil.rmtree(tmp, ignore_errors=True) if tmp.is_dir() else tmp.unlink(missing_ok=True)
        previous = (out / "ckpt.pt").resolve() if (out / "ckpt.pt").exists() else None
        kept = (f"the previous checkpoint {previous.name} is intact: free space, then --resume=True continues from it"
                if previous else "this run has no checkpoint yet: free space and start it again")
        raise UserError(f"saving checkpoint {path} (step {step}) failed: {cause}; {kept}") from error
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


def _seal(path):
    """Give a torch.save file the zip comment SEAL + the CRC-32 (8 hex digits) of every byte before those digits: the
    zip's directory and end records included, which the per-entry CRC-32s of the zip leave unchecked."""
    size = path.stat().st_size
    with open(path, "r+b") as f:
        f.seek(size - 22)
        end = f.read(22)
        if end[:4] != END or end[20:] != b"\0\0":
            raise RuntimeError(f"torch.save wrote {path} without a plain end-of-central-directory record at its end")
        f.seek(size - 2)
        f.write(struct.pack("<H", len(SEAL) + 8) + SEAL)
        f.flush()
        f.write(b"%08x" % _crc32(path))


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


FULL_BYTES = 1 << 24  # a write that failed with less free space than this ran out of it


def _cause(error, folder):
    """Why a checkpoint could not be written to `folder`, in a few words: a full disk (or quota) as such, from the
    errno of an OSError anywhere inside `error`, or from the disk itself where torch's C++ writer dropped the OSError
    (torch 2.13's "unexpected pos 704 vs 598"); otherwise the error's first line (a CheckpointException's: that of
    its first rank's failure)."""
    if error is None:
        return "another rank's write failed"
    inside = _inside(error)
    code = next((e.errno for e in inside if isinstance(e, OSError) and e.errno), None)
    try:
        disk = os.statvfs(folder)
        full = disk.f_bavail * disk.f_frsize < FULL_BYTES
    except OSError:
        full = False
    if code in (errno.ENOSPC, errno.EDQUOT) or code is None and full:
        return os.strerror(code if code == errno.EDQUOT else errno.ENOSPC).lower()
    # a CheckpointException's own text is "CheckpointException ranks:dict_keys([0, 1])": the first rank's failure
    first = next((e for e in inside if type(e).__name__ != "CheckpointException"), error)
    text = str(first).strip()
    return f"{type(first).__name__}: {text.splitlines()[0]}" if text else type(first).__name__


def _inside(error):
    """`error` and every exception inside it, breadth first: causes, contexts, and each rank's failure of a
    torch.distributed.checkpoint CheckpointException ({rank: (exception, traceback)}; pickled from other ranks)."""
    found, queue = [], [error]
    while queue:
        e = queue.pop(0)
        e = e[0] if isinstance(e, tuple) and e else e
        if isinstance(e, BaseException) and all(e is not f for f in found):
            found.append(e)
            failures = getattr(e, "failures", None)
            queue += [e.__cause__, e.__context__, *(failures.values() if isinstance(failures, dict) else ())]
    return found


# -----------------------------------------------------------------------------
# Loading

def _checkpoints(folder):
    """The ckpt_{step}.pt checkpoints of a folder, oldest first."""
    return sorted(p for p in Path(folder).glob("ckpt_*.pt") if p.name[5:-3].isdigit())


def _fallback(path):
    """What to do instead of reading the damaged checkpoint `path`: the other checkpoints of its folder, newest first
    (those older than it, when it is one of ckpt_*.pt; any, when it is RUN/ckpt.pt), and how to resume or branch
    from one."""
    path = Path(path)
    latest = path.parent / "ckpt.pt"
    others = [p for p in _checkpoints(path.parent) if p.name != path.name][::-1]
    numbered = path.name.startswith("ckpt_") and path.name[5:-3].isdigit()
    older = [p for p in others if p.name < path.name] if numbered else others
    if not older:
        if not others:
            return "no older checkpoint is left in that folder" if numbered else "no other checkpoint is in that folder"
        newer = "a newer one is" if len(others) == 1 else "newer ones are"
        return (f"no older checkpoint is left in that folder; {newer} ({', '.join(p.name for p in others)}): branch "
                f"from it with --init_from={others[0]}")
    relink = shlex.join(["ln", "-sfn", older[0].name, str(latest)])
    if latest.is_dir() and not latest.is_symlink():  # ln would put the link inside the folder
        relink = f"{shlex.join(['rm', '-r', str(latest)])} && {shlex.join(['ln', '-s', older[0].name, str(latest)])}"
    return (f"fall back to {'an older one' if numbered else 'another checkpoint of that folder'} "
            f"({', '.join(p.name for p in older)}), e.g. {relink}, then --resume=True, or branch from it with "
            f"--init_from={older[0]}")


def _resolve(path):
    """`path` with its links followed; a UserError for a path to nothing, a link to nothing or a symlink loop."""
    path = Path(path)
    try:
        return path.resolve(strict=True)
    except FileNotFoundError:
        if not path.is_symlink():
            raise UserError(f"no checkpoint at {path}: pass a ckpt_*.pt file or folder (or RUN/ckpt.pt) written by "
                            f"train.py") from None
        problem = f"links to {os.readlink(path)}, which does not exist"
    except (RuntimeError, OSError):  # a loop: RuntimeError before Python 3.13, OSError (ELOOP) from 3.13
        problem = "is a symlink loop" + (f" (it links to {os.readlink(path)})" if path.is_symlink() else "")
    raise UserError(f"checkpoint {path} {problem}: {_fallback(path)}")


def newest(out_dir):
    """The checkpoint out_dir/ckpt.pt links to (ckpt.pt itself where it is no link: verify judges it); a UserError
    naming the newest checkpoint if the link is missing, leads nowhere or loops."""
    latest = Path(out_dir) / "ckpt.pt"
    if latest.is_symlink():
        try:
            return latest.resolve(strict=True)
        except FileNotFoundError:
            problem = f"{latest} links to {os.readlink(latest)}, which does not exist,"
        except (RuntimeError, OSError):  # a loop: RuntimeError before Python 3.13, OSError (ELOOP) from 3.13
            problem = f"{latest} is a symlink loop (it links to {os.readlink(latest)}),"
    elif latest.exists():
        return latest
    else:
        problem = f"{latest} is missing"
    found = _checkpoints(out_dir)
    if found:
        raise UserError(f"{problem} but {out_dir} holds {', '.join(f.name for f in found)}: point it at the newest, "
                        f"{shlex.join(['ln', '-sfn', found[-1].name, str(latest)])}, then resume")
    raise UserError(f"no checkpoint in {out_dir} ({problem.rstrip(',')}): nothing to resume")


def verify(path):
    """Check every byte of a checkpoint against its checksums before it is read, and return its path with links
    followed; a UserError names a damaged one and the checkpoints beside it to fall back to. A file written before
    files carried the CRC-32 of all their bytes (one without a zip comment) is still read when the zip's own checks
    pass (_zip_damage): every entry's CRC-32, and entries as torch.save writes them; the rest of its zip directory is
    covered by no checksum. Under torch.distributed the ranks share the work."""
    path = _resolve(path)  # RUN/ckpt.pt: name the checkpoint it links to, and the ones beside it
    bad = _folder_damage(path) if path.is_dir() else _file_damage(path)
    if bad:
        raise UserError(f"checkpoint {path} is damaged ({bad}): {_fallback(path)}")
    return path


def _folder_damage(path):
    """What is wrong with an FSDP checkpoint folder, or None: checksums.json must map the name of every other file of
    the folder, and nothing else, to the CRC-32 that file has. The ranks share the reading and agree on the answer."""
    listed, bad, checksums = path / CHECKSUMS, None, {}
    try:
        checksums = json.loads(listed.read_bytes())
    except FileNotFoundError:
        bad = f"{listed} is missing"
    except (OSError, ValueError):  # a folder; not UTF-8, not JSON
        bad = f"{listed} is not JSON"
    if bad is None:
        if not isinstance(checksums, dict) or not all(type(v) is int and 0 <= v < 1 << 32 for v in checksums.values()):
            bad = f"{listed} is not a map of file names to CRC-32s"
        else:
            present = {f.name for f in path.iterdir()} - {CHECKSUMS}
            absent, unlisted = sorted(set(checksums) - present), sorted(present - set(checksums))
            odd = [name for name in sorted(checksums) if not (path / name).is_file()]
            bad = (f"{path / absent[0]} is missing" if absent else
                   f"{path / unlisted[0]} is not listed in {CHECKSUMS}" if unlisted else
                   f"{path / odd[0]} is not a file" if odd else None)
    rank, world = (dist.get_rank(), dist.get_world_size()) if dist.is_initialized() else (0, 1)
    for name in [] if bad else sorted(checksums)[rank::world]:
        if _crc32(path / name) != checksums[name]:
            bad = f"{path / name} does not match its checksum"
            break
    if dist.is_initialized():
        found = [None] * world
        dist.all_gather_object(found, bad)
        bad = next((b for b in found if b), None)
    return bad


def _file_damage(path):
    """What is wrong with a torch.save file, or None. One that save sealed (_seal) must match the CRC-32 at its end,
    which covers every other byte; one with no zip comment, written before, is checked as a zip (_zip_damage)."""
    if not path.is_file():
        return "not a file"
    size, n = path.stat().st_size, len(SEAL) + 8
    with open(path, "rb") as f:
        f.seek(max(0, size - 22 - n))
        tail = f.read()
    if len(tail) == 22 + n and tail[:4] == END and tail[20:22] == struct.pack("<H", n) and tail[22:-8] == SEAL:
        if tail[-8:].strip(b"0123456789abcdef"):
            return "its CRC-32 is not 8 hex digits"
        return "the whole file does not match its CRC-32" if _crc32(path, size - 8) != int(tail[-8:], 16) else None
    if len(tail) >= 22 and tail[-22:-18] == END and tail[-2:] == b"\0\0":
        return _zip_damage(path)
    return "not a complete torch.save file: its end is missing or damaged"


def _zip_damage(path):
    """What is wrong with a torch.save file that lacks a CRC-32 of all its bytes, or None: every entry must match its
    CRC-32 and be a plain stored file, as torch.save writes them (a zip reader would give a "folder" no bytes)."""
    try:
        with zipfile.ZipFile(path) as z:
            name = z.testzip()  # reads every entry and checks its CRC-32
            odd = next((i.filename for i in z.infolist()
                        if i.is_dir() or i.external_attr & 0x10 or i.compress_type != zipfile.ZIP_STORED), None)
    except (zipfile.BadZipFile, EOFError, OSError, ValueError, RuntimeError, NotImplementedError) as e:
        return f"not a complete torch.save file: {e}"  # RuntimeError: "encrypted"; NotImplementedError: a method
    if name:
        return f"entry {name} does not match its CRC-32"
    return f"entry {odd} is not a plain file as torch.save writes them" if odd else None


def read_train_state(path):
    """The train state of a verified checkpoint (a dict with TRAIN_STATE_KEYS; a file's also holds model and
    optimizer)."""
    path = verify(path)
    state_file = path / "train_state.pt" if path.is_dir() else path
    try:
        state = torch.load(state_file, map_location="cpu", weights_only=False)  # ours: configs and RNG states
    except Exception as e:  # a zip that is not a torch checkpoint: torch raises RuntimeError, pickle others
        raise UserError(f"{state_file} is not a checkpoint written by train.py ({type(e).__name__}: "
                        f"{str(e).splitlines()[0] if str(e) else ''}): {_fallback(path)}") from None
    missing = [k for k in TRAIN_STATE_KEYS + (() if path.is_dir() else ("model", "optimizer"))
               if not isinstance(state, dict) or k not in state]
    if missing:
        raise UserError(f"{state_file} is not a checkpoint written by train.py: it lacks {missing}: {_fallback(path)}")
    odd = [k for k in ("config", "model_config", "model") if k in state and not isinstance(state[k], dict)]
    odd += [] if path.is_dir() or odd else [k for k, v in state["model"].items() if not isinstance(v, torch.Tensor)]
    if odd:
        raise UserError(f"{state_file} is not a checkpoint written by train.py: its {odd[0]} is not what train.py "
                        f"saves: {_fallback(path)}")
    return state


SHAPE_SETTINGS = ("vocab_size", "dim", "n_layers", "n_heads", "n_kv_heads", "ffn_dim", "qk_norm", "n_experts",
                  "expert_ffn_dim", "shared_expert_ffn_dim")  # the ModelConfig fields that decide the weights


def _check_fits(path, state, model, saved):
    """A UserError unless the checkpoint's weights (`saved`: {key: shape}) are the ones `model` holds, naming the first
    difference and the setting that most likely explains it."""
    wanted = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    key = axis = None
    for k, shape in wanted.items():
        if k not in saved or saved[k] != shape:
            key = k
            axis = next((i for i, (a, b) in enumerate(zip(saved[k], shape)) if a != b), None) if k in saved else None
            problem = f"{k} is {saved[k]} in it, {shape} in the model" if k in saved else f"it lacks {k}"
            break
    else:
        key = next((k for k in saved if k not in wanted), None)
        if key is None:
            return
        problem = f"it holds {key}, which the model lacks"
    theirs = state["model_config"]
    theirs = {s: theirs.get(s, ModelConfig.__dataclass_fields__[s].default) for s in SHAPE_SETTINGS}
    differing = [s for s in SHAPE_SETTINGS if theirs[s] != getattr(model.cfg, s)]
    setting = _likely_setting(key, axis, saved, wanted, model.cfg)
    if differing:  # another model than the checkpoint's (train.py's init_from): the setting that differs
        setting = setting if setting in differing else differing[0]
        raise UserError(f"checkpoint {path} does not fit the model: {problem} (most likely {setting}: the checkpoint's "
                        f"model_config has {setting}={theirs[setting]!r}, this model {setting}="
                        f"{getattr(model.cfg, setting)!r}): build the model with the checkpoint's {setting}")
    why = (f"most likely {setting}: its model_config says {setting}={theirs[setting]!r}, which its weights do not "
           f"match" if setting else "its weights do not match its model_config")
    raise UserError(f"checkpoint {path} does not fit the model: {problem} ({why}; it was edited, or saved by another "
                    f"version of model.py): {_fallback(path)}")


def _likely_setting(key, axis, saved, wanted, cfg):
    """The ModelConfig field that most likely explains why one side lacks weight `key` (axis None) or why its size
    along `axis` differs; None if no field does."""
    parts = key.split(".")
    if axis is None:
        if key in saved and key in wanted:  # shapes of different lengths
            return "n_experts" if "mlp" in parts else None
        other = saved if key in wanted else wanted
        if parts[0] == "layers" and not any(k.startswith(f"layers.{parts[1]}.") for k in other):
            return "n_layers"
        if "q_norm" in parts or "k_norm" in parts:
            return "qk_norm"
        return "shared_expert_ffn_dim" if "shared" in parts else "n_experts" if "mlp" in parts else None
    if parts[0] in ("embed", "lm_head"):
        return "vocab_size" if axis == 0 else "dim"
    if "q_norm" in parts or "k_norm" in parts:
        return "n_heads"
    if "router" in parts or "expert_bias" in parts or ("experts" in parts and axis == 0):
        return "n_experts"
    if wanted[key][axis] == cfg.dim:
        return "dim"
    if "wk" in parts or "wv" in parts:
        return "n_kv_heads"
    if "attn" in parts:
        return "n_heads"
    return ("shared_expert_ffn_dim" if "shared" in parts else "expert_ffn_dim" if "experts" in parts else
            "ffn_dim" if "mlp" in parts else "dim")


def load_into(path, state, model, optimizer=None):
    """Fill model (and optimizer) in place from checkpoint `path` whose train state is `state` (read_train_state).
    An FSDP folder is read into whatever this process holds: the same sharding, another one, or one whole model.
    Weights that do not fit the model (a key missing or extra, another shape) are refused in one line that names the
    setting that most likely explains it."""
    path = Path(path)
    if path.is_dir():
        import torch.distributed.checkpoint as dcp
        metadata = dcp.FileSystemReader(str(path)).read_metadata().state_dict_metadata
        _check_fits(path, state, model, {k.removeprefix("model."): tuple(m.size) for k, m in metadata.items()
                                         if k.startswith("model.") and hasattr(m, "size")})
        if optimizer is None:
            shards = {"model": model.state_dict()}
            _load_shards(shards, path)  # fills the tensors in place
            model.load_state_dict(shards["model"])
            return
        from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict
        model_state, optimizer_state = get_state_dict(model, optimizer)
        shards = {"model": model_state, "optimizer": optimizer_state}
        _load_shards(shards, path)
        set_state_dict(model, optimizer, model_state_dict=shards["model"], optim_state_dict=shards["optimizer"])
        return
    _check_fits(path, state, model, {k: tuple(v.shape) for k, v in state["model"].items()})
    if any(hasattr(p, "device_mesh") for p in model.parameters()):  # whole weights into an FSDP2-sharded model
        from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict
        set_model_state_dict(model, state["model"], options=StateDictOptions(full_state_dict=True))
    else:
        model.load_state_dict(state["model"])
    if optimizer is not None:
        optimizer.load_state_dict(state["optimizer"])


def _load_shards(shards, path):
    """dcp.load, which warns that it assumes one process when torch.distributed is not initialized: here that is
    meant (eval.py, sample.py and the exporter read a sharded checkpoint whole), so that one warning is silenced."""
    import torch.distributed.checkpoint as dcp
    with warnings.catch_warnings():
        if not dist.is_initialized():
            warnings.filterwarnings("ignore", message="torch.distributed is disabled, unavailable or uninitialized")
        dcp.load(shards, checkpoint_id=path)


def load_model(path, device="cpu"):
    """A train.py checkpoint (file or FSDP folder) -> (the model in eval mode on `device`, its train state)."""
    path = _resolve(path)  # RUN/ckpt.pt: the checkpoint it links to now, read from verifying to loading
    state = read_train_state(path)
    unknown = sorted(set(state["model_config"]) - set(ModelConfig.__dataclass_fields__))
    if unknown:
        raise UserError(f"{path} was saved by another version of model.py: its model_config has {unknown}, which "
                        f"this ModelConfig lacks")
    try:
        model = Transformer(ModelConfig(**state["model_config"]))
    except (TypeError, ValueError) as e:
        raise UserError(f"checkpoint {path} holds a model_config that builds no model ({e}): {_fallback(path)}") \
            from None
    load_into(path, state, model)
    return model.to(device).eval(), state


def run_tokenizer(config):
    """The tokenizer a run trained with, as its config (a checkpoint's) names it."""
    name = config["tokenizer"]
    if name.startswith("llama3:") and not os.path.isfile(name.removeprefix("llama3:")):
        raise UserError(f"the checkpoint's tokenizer {name!r}: no such file seen from {os.getcwd()}; run from the "
                        f"folder training ran in")
    return data.get_tokenizer(name)
