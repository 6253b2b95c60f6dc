"""
Pre-training with Token Superposition Training: every stage in one process.

    python train.py config/tiny_tst.py                          # CPU, offline, minutes
    python train.py config/270m_tst.py --batch_size=32          # one GPU; --key=value overrides any setting
    torchrun --nproc_per_node=8 train.py -- config/270m_tst.py  # DDP on one node (FSDP2 with fsdp=True)
    python train.py config/tiny_tst.py --resume=True            # continue from out_dir/ckpt.pt, exactly

The Schedule in tst.py says what each step does: read bags of s tokens and predict the next bag, or ordinary next-token
training. The lines whose comment starts with TST are the method's whole footprint here; deleted (with tst.py and the
two such lines of model.py) they leave a plain pre-training script.
"""

import ast
import contextlib
import json
import math
import os
import random
import shlex
import shutil
import sys
import time
import zipfile
from dataclasses import fields
from pathlib import Path
from types import SimpleNamespace

import torch
import torch.distributed as dist

import data
import tst  # TST
from data import UserError
from model import ModelConfig, Transformer

# -----------------------------------------------------------------------------
# Every setting, with its default: a baseline on the offline corpus. A config file is plain Python that assigns some
# of these names; --key=value on the command line overrides them and must keep the default's type.
DEFAULTS = dict(
    out_dir="out/run",  # checkpoints, config.json, log.jsonl
    seed=1337,
    # data: a folder of shards written by data.py, which records the tokenizer it used. A missing folder is prepared
    # here only for the offline corpus (data_source "stdlib"); anything else is prepared with the command printed.
    data_dir="data/stdlib_bytes",
    data_source="stdlib",
    tokenizer="bytes",
    # batch: seq_len positions per row, batch_size rows per micro-batch per process, global_batch_tokens positions
    # per optimizer step (gradient accumulation makes up the difference; 0 = no accumulation)
    seq_len=128,
    batch_size=16,
    global_batch_tokens=0,
    max_steps=600,
    # AdamW and one Warmup-Stable-Decay schedule over all max_steps: linear warm-up, constant, linear decay to 0
    lr=3e-3,
    warmup_steps=30,
    decay_frac=0.1,
    weight_decay=0.1,
    beta1=0.9,
    beta2=0.95,
    grad_clip=1.0,  # 0 = no clipping
    # evaluation, logging, checkpoints
    eval_interval=100,  # held-out next-token loss every eval_interval steps, at every stage boundary and at the end
    eval_tokens=65536,  # positions scored per evaluation: fixed rows from the start of the val split
    log_interval=10,  # console lines; log.jsonl gets every step
    ckpt_interval=200,
    keep_last=2,  # checkpoints kept, besides the one at each stage boundary
    resume=False,
    # system
    device="auto",  # auto | cpu | cuda
    dtype="auto",  # auto (bfloat16 on CUDA, float32 on CPU) | float32 | bfloat16
    compile=False,
    fsdp=False,  # FSDP2 (per-block sharding, bf16 parameters, fp32 gradient reduction) instead of DDP
    peak_flops=0.0,  # per-device peak FLOP/s for MFU; 0 = 989e12 (H100/H200 dense bf16) on CUDA, none on CPU
)
DEFAULTS.update(tst.DEFAULTS)  # TST: s, r, s_schedule, tst_mode, bag_weights, reinit_at_switch
# The model's settings are ModelConfig's fields, under the same names (vocab_size 0 = the tokenizer's).
MODEL_KEYS = [f.name for f in fields(ModelConfig)]
DEFAULTS.update({k: v for k, v in ModelConfig().to_dict().items() if k != "vocab_size"}, vocab_size=0)
# Settings a resumed run may change; every other one must match the checkpoint's.
RESUMABLE_KEYS = {"out_dir", "resume", "eval_interval", "eval_tokens", "log_interval", "ckpt_interval", "keep_last",
                  "compile", "device", "peak_flops", "data_dir"}


def parse_config(argv):
    """Defaults <- config files <- --key=value, each key known and each value of its default's type."""
    config = dict(DEFAULTS)

    def assign(key, value, where):
        if key not in DEFAULTS:
            raise UserError(f"{where}: unknown setting {key!r}; the settings are the names in train.py's DEFAULTS")
        default = DEFAULTS[key]
        if isinstance(default, float) and isinstance(value, int) and not isinstance(value, bool):
            value = float(value)
        allowed = (str, list) if key == "bag_weights" else (type(default),)
        if not isinstance(value, allowed):
            raise UserError(f"{where}: {key}={value!r} is a {type(value).__name__}, "
                            f"but {key} takes a {' or '.join(t.__name__ for t in allowed)}")
        if key == "s_schedule":  # tuples or lists, from a file or the command line: the same schedule
            value = [tuple(pair) if isinstance(pair, (list, tuple)) else pair for pair in value]
        config[key] = value

    for arg in argv:
        if arg.startswith("--"):
            key, sep, text = arg[2:].partition("=")
            if not sep:
                raise UserError(f"{arg}: write overrides as --key=value")
            try:
                value = ast.literal_eval(text)
            except (ValueError, SyntaxError):
                value = text  # a bare string
            if isinstance(DEFAULTS.get(key), str) and not isinstance(value, list):
                value = text  # a string setting keeps what was typed, even "1e-3" or "True"
            assign(key, value, arg)
        else:
            path = Path(arg)
            if not path.is_file():
                raise UserError(f"config file {arg} not found")
            namespace = {"__file__": str(path)}
            exec(path.read_text(), namespace)
            for key, value in namespace.items():
                if not key.startswith("_") and not callable(value) and type(value).__name__ != "module":
                    assign(key, value, str(path))
    check_config(config)
    return config


def check_config(config, world_size=1):
    """Reject impossible settings before any work, naming the setting, its value and what is allowed."""
    value = SimpleNamespace(**config)  # value.lr: shorter than config["lr"]
    rows_tokens = value.batch_size * value.seq_len * world_size
    checks = [
        (value.out_dir.strip() != "", "out_dir is empty: name the folder for checkpoints and logs"),
        (0 <= value.seed < 2**32, f"seed={value.seed}: must be in [0, 2**32)"),
        (value.max_steps >= 1, f"max_steps={value.max_steps}: must be >= 1"),
        (value.seq_len >= 1 and value.batch_size >= 1, "seq_len and batch_size must be >= 1"),
        (value.seq_len <= value.max_seq_len, f"seq_len={value.seq_len} exceeds max_seq_len={value.max_seq_len}"),
        (value.lr > 0, f"lr={value.lr}: must be > 0"),
        (value.grad_clip >= 0, f"grad_clip={value.grad_clip}: must be >= 0 (0 = no clipping)"),
        (0 <= value.decay_frac <= 1, f"decay_frac={value.decay_frac}: must be in [0, 1]"),
        (0 <= value.warmup_steps <= value.max_steps - round(value.decay_frac * value.max_steps),
         f"warmup_steps={value.warmup_steps}: must fit before the decay (max_steps={value.max_steps}, "
         f"decay_frac={value.decay_frac})"),
        (value.device in ("auto", "cpu", "cuda"), f"device={value.device!r}: use auto, cpu or cuda"),
        (value.dtype in ("auto", "float32", "bfloat16"), f"dtype={value.dtype!r}: use auto, float32 or bfloat16"),
        (value.eval_tokens >= value.seq_len,
         f"eval_tokens={value.eval_tokens}: an evaluation scores at least one row of seq_len={value.seq_len}"),
        (min(value.eval_interval, value.log_interval, value.ckpt_interval, value.keep_last) >= 1,
         "eval_interval, log_interval, ckpt_interval and keep_last must be >= 1"),
        (value.global_batch_tokens % rows_tokens == 0,
         f"global_batch_tokens={value.global_batch_tokens} is not a multiple of batch_size * seq_len * processes "
         f"= {value.batch_size} * {value.seq_len} * {world_size} = {rows_tokens}"),
    ]
    for ok, message in checks:
        if not ok:
            raise UserError(message)
    try:  # the model's and the method's own checks, which name the setting
        ModelConfig(**{k: config[k] for k in MODEL_KEYS if k != "vocab_size"})
        tst.Schedule(config, value.max_steps)  # TST
    except ValueError as e:
        raise UserError(str(e)) from None


def lr_at(step, config):
    """Warmup-Stable-Decay: linear warm-up, constant, then linear decay to 0 over the last decay_frac of all steps."""
    decay_steps = round(config["decay_frac"] * config["max_steps"])
    decay_start = config["max_steps"] - decay_steps
    if step < config["warmup_steps"]:
        return config["lr"] * (step + 1) / config["warmup_steps"]
    if step < decay_start:
        return config["lr"]
    return config["lr"] * (1 - (step - decay_start) / decay_steps)


# -----------------------------------------------------------------------------
# Checkpoints: written under a temporary name and renamed when complete, so a killed run never leaves a broken one.

def checkpoint_path(out_dir, step):
    return Path(out_dir) / f"ckpt_{step:07d}.pt"


def save_checkpoint(run, step, train_state):
    """One file written by rank 0, or under FSDP a folder of the same name in which every rank writes its own shards
    (torch.distributed.checkpoint) beside rank 0's train_state.pt. ckpt.pt links to the newest; the last keep_last
    and those in run.keep_steps stay."""
    out = Path(run.config["out_dir"])
    path = checkpoint_path(out, step)
    tmp = path.with_suffix(".tmp")
    try:
        if run.config["fsdp"]:
            import torch.distributed.checkpoint as dcp
            from torch.distributed.checkpoint.state_dict import get_state_dict
            model_state, optimizer_state = get_state_dict(run.raw_model, run.optimizer)
            if run.master:
                shutil.rmtree(tmp, ignore_errors=True)
            dist.barrier()
            dcp.save({"model": model_state, "optimizer": optimizer_state}, checkpoint_id=tmp)
            if run.master:
                torch.save(train_state, tmp / "train_state.pt")
        elif run.master:
            torch.save({"model": run.raw_model.state_dict(), "optimizer": run.optimizer.state_dict(), **train_state},
                       tmp)
    except (OSError, RuntimeError) as e:  # a full disk: torch.save reports it as a RuntimeError
        shutil.rmtree(tmp, ignore_errors=True) if tmp.is_dir() else tmp.unlink(missing_ok=True)
        raise UserError(f"saving checkpoint {path} (step {step}) failed: {e}. The previous checkpoint is intact: "
                        f"free space, then --resume=True continues from it") from e
    if run.master:
        if path.is_dir():  # a boundary checkpoint saved again by a run resumed from it
            shutil.rmtree(path)
        os.replace(tmp, path)
        latest, link = out / "ckpt.pt", out / "ckpt.lnk"
        link.unlink(missing_ok=True)
        link.symlink_to(path.name)
        os.replace(link, latest)
        keep = {checkpoint_path(out, s).name for s in run.keep_steps}
        for old in sorted(out.glob("ckpt_*.pt"))[:-run.config["keep_last"]]:
            if old.name not in keep:
                shutil.rmtree(old) if old.is_dir() else old.unlink()
    if dist.is_initialized():
        dist.barrier()
    return path


def load_checkpoint(path, run):
    """Restores model and optimizer in place; returns the rest of the checkpoint (step, loader, RNG, ...)."""
    path = path.resolve()
    state_file = path / "train_state.pt" if path.is_dir() else path
    if not zipfile.is_zipfile(state_file):  # what torch.save writes; a truncated file has lost its directory
        raise UserError(f"checkpoint {state_file} is corrupt or truncated: resume from an older ckpt_*.pt by "
                        f"pointing ckpt.pt at it")
    state = torch.load(state_file, map_location="cpu", weights_only=False)
    if not isinstance(state, dict) or not {"config", "step", "loader", "rng"} <= state.keys():
        raise UserError(f"{state_file} is not a train.py checkpoint (expected config, step, loader, rng)")
    differing = {k: (state["config"].get(k), v) for k, v in run.config.items()
                 if k not in RESUMABLE_KEYS and state["config"].get(k) != v}
    if differing:
        lines = "; ".join(f"{k}: checkpoint {old!r}, this run {new!r}" for k, (old, new) in differing.items())
        raise UserError(f"checkpoint {path} was written by a run with other settings ({lines}): resume with the "
                        f"checkpoint's settings or start a new out_dir")
    if path.is_dir():
        import torch.distributed.checkpoint as dcp
        from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict
        model_state, optimizer_state = get_state_dict(run.raw_model, run.optimizer)
        shards = {"model": model_state, "optimizer": optimizer_state}
        dcp.load(shards, checkpoint_id=path)
        set_state_dict(run.raw_model, run.optimizer, model_state_dict=shards["model"],
                       optim_state_dict=shards["optimizer"])
    else:
        run.raw_model.load_state_dict(state.pop("model"))
        run.optimizer.load_state_dict(state.pop("optimizer"))
    return state


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


# -----------------------------------------------------------------------------
# Set-up

def setup_processes(config):
    """Rank, world size and device, from torchrun's environment (one process without it)."""
    distributed = "RANK" in os.environ
    if config["device"] == "auto":
        config["device"] = "cuda" if torch.cuda.is_available() else "cpu"
    if config["device"] == "cuda" and not torch.cuda.is_available():
        raise UserError(f"device=cuda, but this torch ({torch.__version__}) sees no CUDA device: use device=cpu, "
                        f"or install a CUDA build of torch")
    if config["fsdp"] and not distributed:
        raise UserError("fsdp=True shards across processes: launch with torchrun")
    rank, local_rank, world = 0, 0, 1
    if distributed:
        rank, local_rank, world = (int(os.environ[k]) for k in ("RANK", "LOCAL_RANK", "WORLD_SIZE"))
    device = torch.device("cpu")
    if config["device"] == "cuda":
        local_world, gpus = int(os.environ.get("LOCAL_WORLD_SIZE", 1)), torch.cuda.device_count()
        if local_world > gpus:
            raise UserError(f"{local_world} processes on this node but {gpus} visible GPU(s): launch with "
                            f"--nproc_per_node={gpus}, or set device=cpu")
        device = torch.device("cuda", local_rank)
        torch.cuda.set_device(device)
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    if distributed:
        if device.type == "cuda":
            dist.init_process_group("nccl", device_id=device)
        else:
            dist.init_process_group("gloo")
    check_config(config, world)
    if config["dtype"] == "auto":
        config["dtype"] = "bfloat16" if device.type == "cuda" else "float32"
    return SimpleNamespace(config=config, distributed=distributed, rank=rank, world=world, master=rank == 0,
                           device=device, dtype=getattr(torch, config["dtype"]))


def open_data(run):
    """The data folder's metadata. The folder is the authority on its tokenizer; only the offline corpus (stdlib) is
    prepared here when missing."""
    config = run.config
    if not (Path(config["data_dir"]) / "meta.json").exists():
        if config["data_source"] != "stdlib":
            command = shlex.join(["python", "data.py", "--source", config["data_source"], "--tokenizer",
                                  config["tokenizer"], "--out_dir", config["data_dir"]])
            raise UserError(f"no prepared data in data_dir={config['data_dir']}: prepare it first with: {command}")
        if run.master:
            print(f"preparing the offline corpus (Python's standard library, tokenizer {config['tokenizer']}) in "
                  f"{config['data_dir']}")
            data.prepare("stdlib", config["tokenizer"], config["data_dir"])
        if run.distributed:
            dist.barrier()
    meta = data.load_meta(config["data_dir"])
    if meta["tokenizer"] != config["tokenizer"]:
        raise UserError(f"tokenizer={config['tokenizer']!r}, but {config['data_dir']} was prepared with "
                        f"{meta['tokenizer']!r}: set tokenizer={meta['tokenizer']!r}, or point data_dir at data "
                        f"prepared with {config['tokenizer']!r}")
    if config["vocab_size"] == 0:
        config["vocab_size"] = meta["vocab_size"]
    if config["vocab_size"] < meta["vocab_size"]:
        raise UserError(f"vocab_size={config['vocab_size']} is smaller than the data's vocabulary "
                        f"({meta['vocab_size']}, tokenizer {meta['tokenizer']}): use 0 (the data's) or more")
    return meta


def build(run):
    """The model on the device (built on the meta device first: a 10B model never exists in fp32 on every rank's CPU),
    sharded by FSDP2 or wrapped by DDP, compiled if asked, and its AdamW optimizer."""
    config = run.config
    run.model_config = ModelConfig(**{k: config[k] for k in MODEL_KEYS})
    with torch.device("meta"):
        model = Transformer(run.model_config)
    model.to_empty(device=run.device)
    if run.model_config.tie_embeddings:  # to_empty made new tensors: tie the head to the embedding again
        model.lm_head.weight = model.embed.weight
    model.init_weights()  # on the device, from the seed: the same weights on every rank
    run.raw_model = model
    if config["fsdp"]:
        from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard
        policy = MixedPrecisionPolicy(param_dtype=run.dtype, reduce_dtype=torch.float32)
        for block in model.layers:
            fully_shard(block, mp_policy=policy)
        fully_shard(model, mp_policy=policy)
    matrices = [p for p in model.parameters() if p.dim() >= 2]  # weight decay on matrices and embeddings only
    vectors = [p for p in model.parameters() if p.dim() < 2]
    run.optimizer = torch.optim.AdamW(
        [{"params": matrices, "weight_decay": config["weight_decay"]}, {"params": vectors, "weight_decay": 0.0}],
        lr=config["lr"], betas=(config["beta1"], config["beta2"]), fused=run.device.type == "cuda")
    if config["compile"]:
        model = torch.compile(model)  # one graph per input shape: one per stage
    if run.distributed and not config["fsdp"]:
        # buffers (MoE expert loads) are per rank by design; they are all-reduced where they are read
        model = torch.nn.parallel.DistributedDataParallel(
            model, device_ids=[run.device.index] if run.device.type == "cuda" else None, broadcast_buffers=False)
    run.model = model
    # FSDP2 casts parameters to bf16 itself; otherwise autocast runs the matmuls in bf16 over fp32 weights
    use_autocast = run.dtype != torch.float32 and not config["fsdp"]
    run.autocast = torch.autocast(run.device.type, dtype=run.dtype) if use_autocast else contextlib.nullcontext()


def resume(run):
    """Model, optimizer, loader position, RNG and totals from out_dir/ckpt.pt; returns the step to start from."""
    ckpt_file = Path(run.config["out_dir"]) / "ckpt.pt"
    if not ckpt_file.exists():
        raise UserError(f"--resume=True but {ckpt_file} does not exist: nothing to resume")
    ckpt = load_checkpoint(ckpt_file, run)
    run.loader.load_state_dict(ckpt["loader"])
    set_rng_state(ckpt["rng"][run.rank] if run.rank < len(ckpt["rng"]) else ckpt["rng"][0])
    run.totals = ckpt["totals"]
    if run.master:
        print(f"resumed from {ckpt_file.resolve().name} at step {ckpt['step']}")
        truncate_log(Path(run.config["out_dir"]) / "log.jsonl", ckpt["step"])
    return ckpt["step"]


# -----------------------------------------------------------------------------
# Training and evaluation

def train_step(run, step):
    """One optimizer step over grad_accum micro-batches per process -> (its log record, positions, data tokens)."""
    config, T = run.config, run.config["seq_len"]
    row_tokens = T  # data tokens a row consumes (+1, the label of its last position)
    stage = run.schedule.stage(step)  # TST
    row_tokens = stage.data_tokens_per_row(T)  # TST: s*T when bags come in
    lr = lr_at(step, config)
    for group in run.optimizer.param_groups:
        group["lr"] = lr
    sums = torch.zeros(2, device=run.device)  # loss, aux_loss
    for micro in range(run.grad_accum):
        last = micro == run.grad_accum - 1
        if config["fsdp"]:
            run.raw_model.set_requires_gradient_sync(last)
        elif run.distributed:
            run.model.require_backward_grad_sync = last  # all-reduce gradients once per step
        rows = run.loader.next_rows(row_tokens)
        if run.device.type == "cuda":
            rows = rows.pin_memory().to(run.device, non_blocking=True)
        inputs, targets, target_weights = rows[:, :-1], rows[:, 1:], None
        inputs, targets, target_weights = stage.inputs_and_targets(rows)  # TST: bags in, next bag out
        with run.autocast:
            loss, aux_loss = run.model(inputs, targets, target_weights)
        ((loss + aux_loss) / run.grad_accum).backward()
        sums += torch.stack([loss.detach(), aux_loss.detach()])
    grad_norm = torch.nn.utils.clip_grad_norm_(run.model.parameters(), config["grad_clip"] or math.inf)
    if hasattr(grad_norm, "full_tensor"):  # a DTensor under FSDP
        grad_norm = grad_norm.full_tensor()
    sums /= run.grad_accum
    if run.distributed:
        dist.all_reduce(sums)
        sums /= run.world
    loss, aux_loss, grad_norm = sums[0].item(), sums[1].item(), grad_norm.item()
    if not (math.isfinite(loss) and math.isfinite(grad_norm)):
        raise FloatingPointError(f"step {step}: loss {loss}, grad norm {grad_norm}; stopping before the update, so "
                                 f"the last checkpoint in {config['out_dir']} is good (lower lr?)")
    run.optimizer.step()
    run.optimizer.zero_grad(set_to_none=True)
    positions = run.rows_per_step * T
    data_tokens = run.rows_per_step * row_tokens
    run.totals["positions"] += positions
    run.totals["data_tokens"] += data_tokens
    run.totals["flops"] += run.flops_per_position * positions
    record = {"step": step, "loss": loss, "lr": lr, "grad_norm": grad_norm, **run.totals}
    record.update(phase=1 if stage.superposition else 2, s=stage.s)  # TST: the loss is MCE in phase 1
    if run.model_config.n_experts:
        expert_load = run.raw_model.pop_expert_load()
        if run.model_config.balance == "bias":
            run.raw_model.update_expert_bias(expert_load)
        share = expert_load / expert_load.sum(-1, keepdim=True) * run.model_config.n_experts
        record.update(aux_loss=aux_loss, expert_load_max=share.max().item(), expert_load_min=share.min().item())
    return record, positions, data_tokens


@torch.no_grad()
def evaluate(run):
    """Held-out next-token loss on token input (one scale for every stage and run) over the fixed validation rows.
    The processes split the rows among themselves, so the figure does not depend on how many there are."""
    B, rows = run.config["batch_size"], run.val_rows
    mine = rows[run.rank::run.world]
    batches = -(-len(rows) // (run.world * B))  # the same on every rank: FSDP gathers weights in every forward
    total = torch.zeros(2, dtype=torch.float64, device=run.device)  # summed loss, scored tokens
    for i in range(batches):
        batch, scale = mine[i * B:(i + 1) * B], 1.0
        if len(batch) == 0:  # this rank has run out of rows: it joins the forward and counts nothing
            batch, scale = rows[:1], 0.0
        batch = batch.to(run.device)
        with run.autocast:
            loss, _ = run.raw_model(batch[:, :-1], batch[:, 1:])
        n = scale * batch[:, 1:].numel()
        total += torch.stack([loss.double() * n, torch.tensor(n, dtype=torch.float64, device=run.device)])
    if run.distributed:
        dist.all_reduce(total)
    return (total[0] / total[1]).item()


def save(run, done):
    rngs = [None] * run.world
    if run.distributed:
        dist.all_gather_object(rngs, rng_state())
    else:
        rngs = [rng_state()]
    train_state = {"model_config": run.model_config.to_dict(), "config": run.config, "step": done,
                   "loader": run.loader.state_dict(), "totals": dict(run.totals), "rng": rngs}
    return save_checkpoint(run, done, train_state)


def append_log(log_file, record):
    try:
        log_file.write(json.dumps(record) + "\n")
        log_file.flush()
    except OSError as e:
        raise UserError(f"writing {log_file.name} failed ({e}): free space, then --resume=True continues from the "
                        f"last checkpoint") from e


def print_record(record, peak):
    phase = {1: f" | phase 1 (s={record.get('s')}, MCE)", 2: " | phase 2"}.get(record.get("phase"), "")
    print(f"step {record['step']:6d}{phase} | loss {record['loss']:.4f}"
          + (f" | val {record['val_loss']:.4f}" if "val_loss" in record else "")
          + f" | lr {record['lr']:.2e} | grad {record['grad_norm']:.2f} | {record['tokens_per_sec']:,.0f} pos/s"
          + f" {record['data_tokens_per_sec']:,.0f} data tok/s"
          + (f" | mfu {100 * record['mfu']:.1f}%" if peak else "") + f" | {1000 * record['dt']:.0f} ms")


def main(argv):
    config = parse_config(argv)
    run = setup_processes(config)
    torch.manual_seed(config["seed"])
    random.seed(config["seed"])
    T, out_dir = config["seq_len"], Path(config["out_dir"])

    # ---- data
    meta = open_data(run)
    run.schedule = tst.Schedule(config, config["max_steps"])  # TST
    longest_row = T + 1
    longest_row = run.schedule.longest_row(T)  # TST: rows of s*T + 1 tokens in superposition
    if meta["train_tokens"] < longest_row:
        raise UserError(f"rows of {longest_row} tokens do not fit the {meta['train_tokens']} train tokens of "
                        f"{config['data_dir']}: prepare more data or lower seq_len or s")
    run.loader = data.TokenLoader(config["data_dir"], "train", config["batch_size"], seed=config["seed"],
                                  rank=run.rank, world_size=run.world)
    run.val_rows = data.validation_rows(config["data_dir"], T, config["eval_tokens"] // T)  # checks the val shards
    run.grad_accum = max(1, config["global_batch_tokens"] // (config["batch_size"] * T * run.world))
    run.rows_per_step = config["batch_size"] * run.grad_accum * run.world

    # ---- model, optimizer, and where to start
    build(run)
    run.flops_per_position = run.model_config.flops_per_position(T)
    run.totals = {"positions": 0, "data_tokens": 0, "flops": 0}
    run.keep_steps = []  # checkpoints kept for good
    run.keep_steps = run.schedule.boundaries  # TST: the checkpoint at each switch (the paper's phase-1 checkpoint)
    out_dir.mkdir(parents=True, exist_ok=True)
    start_step = 0
    if config["resume"]:
        start_step = resume(run)
        if start_step >= config["max_steps"]:
            if run.master:
                print(f"{out_dir} is complete: all {config['max_steps']} steps are done, nothing to resume. "
                      f"max_steps sets the schedule (warm-up, decay, stages), so a longer run is a new run in a new "
                      f"out_dir")
            if run.distributed:
                dist.destroy_process_group()
            return run.raw_model
    elif any(out_dir.glob("ckpt_*.pt")):
        raise UserError(f"out_dir={out_dir} holds another run's checkpoints: continue it with --resume=True, or give "
                        f"this run a new out_dir")
    peak = config["peak_flops"] or (989e12 if run.device.type == "cuda" else 0.0)
    log_file = None
    if run.master:
        (out_dir / "config.json").write_text(json.dumps(config, indent=2) + "\n")
        if not config["resume"]:
            (out_dir / "log.jsonl").unlink(missing_ok=True)  # a run that died before its first checkpoint
        log_file = open(out_dir / "log.jsonl", "a")
        n = run.model_config.num_params()
        print(json.dumps(config))
        print(f"model: {n / 1e6:.1f}M parameters ({run.model_config.num_params(embedding=False) / 1e6:.1f}M "
              f"non-embedding), {run.flops_per_position / 1e6:.1f} MFLOP per position; {run.world} process(es) on "
              f"{run.device.type}, {config['dtype']}; weights + gradients + AdamW moments (fp32) "
              f"~{16 * n / (run.world if config['fsdp'] else 1) / 2**30:.2f} GiB per device, before activations")
        print(f"{run.rows_per_step} rows x {T} positions per step ({run.grad_accum} micro-step(s) of "
              f"{config['batch_size']} rows per process); validation: {len(run.val_rows)} rows = "
              f"{len(run.val_rows) * T:,} positions of the {meta['val_tokens']:,}-token val split")
        print(run.schedule.describe(T))  # TST

    # ---- the loop
    step_start = time.time()
    for step in range(start_step, config["max_steps"]):
        run.schedule.begin_step(step, run.raw_model, run.optimizer, announce=run.master)  # TST: a new stage?
        record, positions, data_tokens = train_step(run, step)
        dt = time.time() - step_start
        record.update(tokens_per_sec=positions / dt, data_tokens_per_sec=data_tokens / dt, dt=dt,
                      mfu=run.flops_per_position * positions / dt / (peak * run.world) if peak else None)
        done = step + 1
        milestone = done == config["max_steps"]
        milestone = milestone or done in run.schedule.boundaries  # TST: evaluate and save at every switch
        if done % config["eval_interval"] == 0 or milestone:
            record["val_loss"] = evaluate(run)
        if run.master:
            append_log(log_file, record)
            if step % config["log_interval"] == 0 or "val_loss" in record:
                print_record(record, peak)
        if done % config["ckpt_interval"] == 0 or milestone:
            path = save(run, done)
            if run.master and done in run.keep_steps:
                print(f"saved {path}, kept for good")
        step_start = time.time()  # evaluation and checkpoints are not training time
    if run.master:
        log_file.close()
        print(f"done: {config['max_steps']} steps, {run.totals['positions']:,} positions, "
              f"{run.totals['data_tokens']:,} data tokens, final val loss {record['val_loss']:.4f}")
    if run.distributed:
        dist.destroy_process_group()
    return run.raw_model


if __name__ == "__main__":
    try:
        main(sys.argv[1:])
    except UserError as e:
        if int(os.environ.get("RANK", 0)) == 0:
            print(f"error: {e}", file=sys.stderr)
        sys.exit(1)
