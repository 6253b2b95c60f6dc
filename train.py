"""
Pre-training with Token Superposition Training: both phases in one process.

    python train.py config/tiny_tst.py                          # CPU, offline, a few minutes
    python train.py config/270m_tst.py --batch_size=32          # one GPU; --key=value overrides any default
    torchrun --nproc_per_node=8 train.py config/270m_tst.py     # DDP on one node (FSDP2 with fsdp=True)
    python train.py config/tiny_tst.py --resume=True            # continue from out_dir/ckpt.pt, exactly

Steps [0, floor(r * max_steps)) are phase 1 (rows of s*T+1 tokens folded into bags, MCE loss); the rest are
phase 2 (ordinary next-token training on rows of T+1 tokens). The lines marked "TST" are the whole method's
footprint here; with s = 1 or r = 0 this is a plain pre-training script.
"""

import ast
import contextlib
import json
import math
import os
import random
import shutil
import sys
import time
from dataclasses import fields
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn.functional as F

import data
import tst
from model import ModelConfig, Transformer

# -----------------------------------------------------------------------------
# Every setting, with its default (the tiny offline CPU run). A config file is plain Python that assigns some
# of these names; --key=value on the command line overrides them and must keep the default's type.
DEFAULTS = dict(
    out_dir="out/tiny_tst",  # checkpoints, config.json, log.jsonl
    seed=1337,
    # data: shards written by data.py; a missing folder is prepared from data_source with tokenizer (stdlib
    # only: anything larger is prepared by hand with the command train.py prints)
    data_dir="data/stdlib_bytes",
    data_source="stdlib",
    tokenizer="bytes",
    # TST (tst.py)
    s=4,  # bag size; 1 = the baseline
    r=0.3,  # fraction of max_steps in phase 1; 0 = the baseline
    tst_mode="full",  # full | input | output: the paper's ablations
    weights="uniform",  # bag weights: uniform | power | power:K | exp | first | [w_1, ..., w_s]
    reinit_at_switch=False,  # re-initialise input embedding and LM head at the switch (the paper's Table 2)
    reset_optimizer_at_switch=False,  # drop the AdamW moments at the switch (as patch-level training does)
    # batch: T positions per row, batch_size rows per micro-batch per process, global_batch_tokens positions
    # per optimizer step (gradient accumulation makes up the difference; 0 = no accumulation)
    seq_len=128,
    batch_size=16,
    global_batch_tokens=0,
    max_steps=600,
    # AdamW and one Warmup-Stable-Decay schedule over all max_steps (both phases)
    lr=3e-3,
    warmup_steps=30,
    decay_frac=0.1,  # linear decay to final_lr_frac * lr over the last decay_frac of the steps
    final_lr_frac=0.0,
    weight_decay=0.1,
    beta1=0.9,
    beta2=0.95,
    grad_clip=1.0,
    # evaluation, logging, checkpoints
    eval_interval=100,  # held-out next-token loss every eval_interval steps (and at the end)
    eval_iters=8,  # validation micro-batches per evaluation
    log_interval=10,  # console lines; log.jsonl gets every step
    ckpt_interval=200,
    keep_last=2,  # checkpoints kept, plus the one taken at the phase switch
    resume=False,
    # system
    device="auto",  # auto | cpu | cuda
    dtype="auto",  # auto (bfloat16 on CUDA, float32 on CPU) | float32 | bfloat16
    compile=False,
    fsdp=False,  # FSDP2 (per-block sharding, bf16 parameters, fp32 gradient reduction) instead of DDP
    peak_flops=0.0,  # per-device peak FLOP/s for MFU; 0 = 989e12 (H100/H200 dense bf16) on CUDA, none on CPU
    wandb_project="",  # log to Weights & Biases too (needs `pip install wandb`)
)
# The model's settings are ModelConfig's fields, under the same names (vocab_size 0 = the tokenizer's).
MODEL_KEYS = [f.name for f in fields(ModelConfig)]
DEFAULTS.update({k: v for k, v in ModelConfig().to_dict().items() if k != "vocab_size"}, vocab_size=0)
# Settings a resumed run may change; every other one must match the checkpoint's.
RESUMABLE_KEYS = {"out_dir", "resume", "eval_interval", "eval_iters", "log_interval", "ckpt_interval",
                  "keep_last", "compile", "wandb_project", "device", "peak_flops", "data_dir"}


def parse_config(argv):
    """Defaults <- config files <- --key=value, each key known and each value of its default's type."""
    config = dict(DEFAULTS)

    def assign(key, value, where):
        if key not in DEFAULTS:
            raise ValueError(f"{where}: unknown setting {key!r}; the settings are the names in train.py's DEFAULTS")
        default = DEFAULTS[key]
        if isinstance(default, float) and isinstance(value, int) and not isinstance(value, bool):
            value = float(value)
        allowed = (str, list) if key == "weights" else (type(default),)
        if not isinstance(value, allowed):
            raise ValueError(f"{where}: {key}={value!r} is a {type(value).__name__}, "
                             f"but {key} takes a {' or '.join(t.__name__ for t in allowed)}")
        config[key] = value

    for arg in argv:
        if arg.startswith("--"):
            key, sep, text = arg[2:].partition("=")
            if not sep:
                raise ValueError(f"{arg}: write overrides as --key=value")
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
                raise FileNotFoundError(f"config file {arg} not found")
            namespace = {"__file__": str(path)}
            exec(path.read_text(), namespace)
            for key, value in namespace.items():
                if not key.startswith("_") and not callable(value) and type(value).__name__ != "module":
                    assign(key, value, str(path))
    check_config(config)
    return config


def check_config(c, world_size=1):
    """Reject impossible settings before any work, naming the setting, its value and what is allowed."""
    def need(ok, message):
        if not ok:
            raise ValueError(message)

    need(c["s"] >= 1, f"s={c['s']}: the bag size must be >= 1 (1 = baseline)")
    need(0 <= c["r"] < 1, f"r={c['r']}: the phase-1 fraction must be in [0, 1) (the paper: 0.2-0.4)")
    need(c["tst_mode"] in tst.MODES, f"tst_mode={c['tst_mode']!r}: use one of {', '.join(tst.MODES)}")
    tst.bag_weights(c["s"], c["weights"])  # raises on bad weights
    need(c["max_steps"] >= 1, f"max_steps={c['max_steps']}: must be >= 1")
    need(c["seq_len"] >= 1 and c["batch_size"] >= 1, "seq_len and batch_size must be >= 1")
    need(c["seq_len"] <= c["max_seq_len"], f"seq_len={c['seq_len']} exceeds max_seq_len={c['max_seq_len']}")
    need(c["lr"] > 0, f"lr={c['lr']}: must be > 0")
    need(c["grad_clip"] >= 0, f"grad_clip={c['grad_clip']}: must be >= 0 (0 = no clipping)")
    need(0 <= c["decay_frac"] <= 1, f"decay_frac={c['decay_frac']}: must be in [0, 1]")
    need(0 <= c["warmup_steps"] <= c["max_steps"] - round(c["decay_frac"] * c["max_steps"]),
         f"warmup_steps={c['warmup_steps']}: must fit before the decay (max_steps={c['max_steps']}, "
         f"decay_frac={c['decay_frac']})")
    need(c["device"] in ("auto", "cpu", "cuda"), f"device={c['device']!r}: use auto, cpu or cuda")
    need(c["dtype"] in ("auto", "float32", "bfloat16"), f"dtype={c['dtype']!r}: use auto, float32 or bfloat16")
    need(c["eval_interval"] >= 1 and c["log_interval"] >= 1 and c["ckpt_interval"] >= 1 and c["keep_last"] >= 1,
         "eval_interval, log_interval, ckpt_interval and keep_last must be >= 1")
    rows_tokens = c["batch_size"] * c["seq_len"] * world_size
    need(c["global_batch_tokens"] % rows_tokens == 0,
         f"global_batch_tokens={c['global_batch_tokens']} is not a multiple of batch_size * seq_len * world_size "
         f"= {c['batch_size']} * {c['seq_len']} * {world_size} = {rows_tokens}")
    ModelConfig(**{k: c[k] for k in MODEL_KEYS if k != "vocab_size"})  # raises on an impossible shape


def lr_at(step, c):
    """Warmup-Stable-Decay: linear warm-up, constant, then linear decay over the last decay_frac of all steps."""
    decay_steps = round(c["decay_frac"] * c["max_steps"])
    decay_start = c["max_steps"] - decay_steps
    if step < c["warmup_steps"]:
        return c["lr"] * (step + 1) / c["warmup_steps"]
    if step < decay_start:
        return c["lr"]
    progress = (step - decay_start) / decay_steps
    return c["lr"] * (1 - progress * (1 - c["final_lr_frac"]))


# -----------------------------------------------------------------------------
# Checkpoints: written to a temporary file and renamed, so a killed run never leaves a broken one.

def checkpoint_path(out_dir, step):
    return Path(out_dir) / f"ckpt_{step:07d}.pt"


def save_checkpoint(c, step, model, optimizer, train_state, switch_step, rank):
    """One file written by rank 0, or under FSDP a folder of the same name in which every rank writes its own
    shards (torch.distributed.checkpoint) beside rank 0's train_state.pt. Either way it is written under a
    temporary name and renamed when complete, so a killed run never leaves a half-written checkpoint."""
    out = Path(c["out_dir"])
    path, tmp = checkpoint_path(out, step), checkpoint_path(out, step).with_suffix(".tmp")
    if c["fsdp"]:
        import torch.distributed.checkpoint as dcp
        from torch.distributed.checkpoint.state_dict import get_state_dict
        model_state, optimizer_state = get_state_dict(model, optimizer)
        if rank == 0:
            shutil.rmtree(tmp, ignore_errors=True)
        dist.barrier()
        dcp.save({"model": model_state, "optimizer": optimizer_state}, checkpoint_id=tmp)
        if rank == 0:
            torch.save(train_state, tmp / "train_state.pt")
    elif rank == 0:
        torch.save({"model": model.state_dict(), "optimizer": optimizer.state_dict(), **train_state}, tmp)
    if rank == 0:
        if path.is_dir():  # the switch checkpoint saved again by a run resumed from it
            shutil.rmtree(path)
        os.replace(tmp, path)
        latest = out / "ckpt.pt"  # a link to the newest, the one --resume and eval.py read
        tmp_link = latest.with_suffix(".lnk")
        tmp_link.unlink(missing_ok=True)
        tmp_link.symlink_to(path.name)
        os.replace(tmp_link, latest)
        keep = {checkpoint_path(out, switch_step).name}
        for old in sorted(out.glob("ckpt_*.pt"))[:-c["keep_last"]]:
            if old.name not in keep:
                shutil.rmtree(old) if old.is_dir() else old.unlink()
    if dist.is_initialized():
        dist.barrier()
    return path


def load_checkpoint(path, config, model, optimizer):
    """Restores model and optimizer in place; returns the rest of the checkpoint (step, loader, RNG, ...)."""
    path = path.resolve()
    try:
        state = torch.load(path / "train_state.pt" if path.is_dir() else path, map_location="cpu", weights_only=False)
    except Exception as e:
        raise RuntimeError(f"checkpoint {path} cannot be read ({type(e).__name__}: {e}); it is corrupt or "
                           f"truncated: resume from an older ckpt_*.pt by pointing ckpt.pt at it") from e
    if not isinstance(state, dict) or not {"config", "step", "loader", "rng"} <= state.keys():
        raise RuntimeError(f"{path} is not a train.py checkpoint (expected config, step, loader, rng)")
    differing = {k: (state["config"].get(k), config[k]) for k in config
                 if k not in RESUMABLE_KEYS and state["config"].get(k) != config[k]}
    if differing:
        lines = "\n".join(f"  {k}: checkpoint {old!r}, this run {new!r}" for k, (old, new) in differing.items())
        raise RuntimeError(f"checkpoint {path} was written by a run with other settings:\n{lines}\n"
                           f"resume with the checkpoint's settings or start a new out_dir")
    if path.is_dir():
        import torch.distributed.checkpoint as dcp
        from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict
        model_state, optimizer_state = get_state_dict(model, optimizer)
        shards = {"model": model_state, "optimizer": optimizer_state}
        try:
            dcp.load(shards, checkpoint_id=path)
        except Exception as e:
            raise RuntimeError(f"the shards of checkpoint {path} cannot be read ({type(e).__name__}: {e})") from e
        set_state_dict(model, optimizer, model_state_dict=shards["model"], optim_state_dict=shards["optimizer"])
    else:
        model.load_state_dict(state.pop("model"))
        optimizer.load_state_dict(state.pop("optimizer"))
    return state


def truncate_log(path, step):
    """Drop the log lines of steps a killed run took after its last checkpoint: they are about to be redone."""
    if path.exists():
        kept = [line for line in path.read_text().splitlines(keepends=True) if json.loads(line)["step"] < step]
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

def ensure_data(c, master, ddp):
    """The data folder's metadata; the offline stdlib corpus is prepared here on first use."""
    meta_path = Path(c["data_dir"]) / "meta.json"
    if not meta_path.exists():
        if c["data_source"] != "stdlib":
            raise FileNotFoundError(
                f"no prepared data in data_dir={c['data_dir']}; prepare it first:\n  python data.py "
                f"--source {c['data_source']} --tokenizer {c['tokenizer']} --out_dir {c['data_dir']}")
        if master:
            print(f"preparing the offline corpus (Python's standard library, tokenizer {c['tokenizer']}) "
                  f"in {c['data_dir']}")
            data.prepare(c["data_source"], c["tokenizer"], c["data_dir"])
        if ddp:
            dist.barrier()
    return data.load_meta(c["data_dir"])


@torch.no_grad()
def estimate_val_loss(model, c, rank, world, device, autocast):
    """Held-out next-token loss on token input (the same scale in both phases): a fixed set of rows."""
    loader = data.TokenLoader(c["data_dir"], "val", c["batch_size"], seed=0, rank=rank, world_size=world)
    total = torch.zeros(2, device=device)  # summed loss, batches
    for _ in range(c["eval_iters"]):
        x, y = tst.batch(loader.next_rows(c["seq_len"]).to(device), c["s"], phase=2)
        with autocast:
            logits = model(x)
        total += torch.stack([F.cross_entropy(logits.flatten(0, 1).float(), y.flatten()), torch.ones((), device=device)])
    if world > 1:
        dist.all_reduce(total)
    return (total[0] / total[1]).item()


def main(argv):
    c = parse_config(argv)

    # ---- processes and devices
    ddp = "RANK" in os.environ
    if c["device"] == "auto":
        c["device"] = "cuda" if torch.cuda.is_available() else "cpu"
    if ddp:
        rank, local_rank, world = int(os.environ["RANK"]), int(os.environ["LOCAL_RANK"]), int(os.environ["WORLD_SIZE"])
        if c["device"] == "cuda":
            torch.cuda.set_device(local_rank)
        dist.init_process_group("nccl" if c["device"] == "cuda" else "gloo")
    else:
        rank, local_rank, world = 0, 0, 1
    if c["fsdp"] and not ddp:
        raise ValueError("fsdp=True shards across processes: launch with torchrun")
    check_config(c, world)
    master = rank == 0
    device = torch.device(f"cuda:{local_rank}" if c["device"] == "cuda" else "cpu")
    if c["dtype"] == "auto":
        c["dtype"] = "bfloat16" if device.type == "cuda" else "float32"
    dtype = getattr(torch, c["dtype"])
    # FSDP2 casts parameters to bf16 itself; otherwise autocast runs the matmuls in bf16 over fp32 weights
    autocast = (torch.autocast(device.type, dtype=dtype) if dtype != torch.float32 and not c["fsdp"]
                else contextlib.nullcontext())
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    torch.manual_seed(c["seed"])
    random.seed(c["seed"])

    # ---- data
    meta = ensure_data(c, master, ddp)
    if c["vocab_size"] == 0:
        c["vocab_size"] = meta["vocab_size"]
    if c["vocab_size"] < meta["vocab_size"]:
        raise ValueError(f"vocab_size={c['vocab_size']} is smaller than the data's vocabulary ({meta['vocab_size']}, "
                         f"tokenizer {meta['tokenizer']}): use vocab_size=0 or at least {meta['vocab_size']}")
    T, s, mode = c["seq_len"], c["s"], c["tst_mode"]
    grad_accum = max(1, c["global_batch_tokens"] // (c["batch_size"] * T * world))
    rows_per_step = c["batch_size"] * grad_accum * world
    longest_row = tst.data_tokens_per_row(T, s, 1, mode) + 1  # TST
    if meta["train_tokens"] < longest_row or meta["val_tokens"] < T + 1:
        raise ValueError(f"rows of {longest_row} tokens (seq_len={T}, s={s}) do not fit the data in "
                         f"{c['data_dir']} ({meta['train_tokens']} train / {meta['val_tokens']} val tokens): "
                         f"prepare more data or lower seq_len or s")
    train_loader = data.TokenLoader(c["data_dir"], "train", c["batch_size"], seed=c["seed"], rank=rank,
                                    world_size=world)

    # ---- model and optimizer
    model_cfg = ModelConfig(**{k: c[k] for k in MODEL_KEYS})
    with torch.device("meta"):  # no memory yet: a 10B model never exists in fp32 on every rank's CPU
        model = Transformer(model_cfg)
    model.to_empty(device=device)
    if model_cfg.tie_embeddings:  # to_empty made new tensors: tie the head to the embedding again
        model.lm_head.weight = model.embed.weight
    model.init_weights()  # on the device, from the seed: the same weights on every rank
    raw_model = model
    if c["fsdp"]:
        from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard
        policy = MixedPrecisionPolicy(param_dtype=dtype, reduce_dtype=torch.float32)
        for block in model.layers:
            fully_shard(block, mp_policy=policy)
        fully_shard(model, mp_policy=policy)
    decay = [p for p in model.parameters() if p.dim() >= 2]  # matrices and embeddings; not norm weights
    no_decay = [p for p in model.parameters() if p.dim() < 2]
    optimizer = torch.optim.AdamW(
        [{"params": decay, "weight_decay": c["weight_decay"]}, {"params": no_decay, "weight_decay": 0.0}],
        lr=c["lr"], betas=(c["beta1"], c["beta2"]), fused=device.type == "cuda")
    if c["compile"]:
        model = torch.compile(model)  # recompiles once at the switch, when the input loses its bag axis
    if ddp and not c["fsdp"]:
        # buffers (MoE expert loads) are per rank by design; they are all-reduced where they are read
        model = torch.nn.parallel.DistributedDataParallel(model, device_ids=[local_rank] if device.type == "cuda"
                                                          else None, broadcast_buffers=False)

    # ---- resume
    start_step, totals = 0, {"positions": 0, "data_tokens": 0, "flops": 0}
    Path(c["out_dir"]).mkdir(parents=True, exist_ok=True)
    ckpt_file = Path(c["out_dir"]) / "ckpt.pt"
    if c["resume"]:
        if not ckpt_file.exists():
            raise FileNotFoundError(f"--resume=True but {ckpt_file} does not exist: nothing to resume")
        ckpt = load_checkpoint(ckpt_file, c, raw_model, optimizer)
        train_loader.load_state_dict(ckpt["loader"])
        set_rng_state(ckpt["rng"][rank] if rank < len(ckpt["rng"]) else ckpt["rng"][0])
        start_step, totals = ckpt["step"], ckpt["totals"]
        del ckpt
        if master:
            print(f"resumed from {ckpt_file.resolve().name} at step {start_step}")
            truncate_log(Path(c["out_dir"]) / "log.jsonl", start_step)
    elif any(Path(c["out_dir"]).glob("ckpt_*.pt")):
        raise FileExistsError(f"out_dir={c['out_dir']} holds another run's checkpoints: continue it with "
                              f"--resume=True, or give this run a new out_dir")
    if master:
        (Path(c["out_dir"]) / "config.json").write_text(json.dumps(c, indent=2) + "\n")
        if not c["resume"]:
            (Path(c["out_dir"]) / "log.jsonl").unlink(missing_ok=True)  # a run that died before its first checkpoint
    log_file = open(Path(c["out_dir"]) / "log.jsonl", "a") if master else None
    if master and c["wandb_project"]:
        try:
            import wandb  # optional: only when asked for
        except ImportError:
            raise ValueError(f"wandb_project={c['wandb_project']!r} but wandb is not installed: pip install wandb")
        wandb.init(project=c["wandb_project"], name=Path(c["out_dir"]).name, config=c, resume="allow")

    # ---- accounting: positions (what the transformer processed: FLOPs) and data tokens are different numbers
    switch = tst.switch_step(c["r"], c["max_steps"], s)  # TST
    bag_weights, token_weight = tst.bag_weights(s, c["weights"]), tst.bag_weights(1)  # TST
    flops_per_position = model_cfg.flops_per_position(T)
    peak = c["peak_flops"] or (989e12 if device.type == "cuda" else 0.0)
    if master:
        n = model_cfg.num_params()
        print(json.dumps(c))
        print(f"model: {n / 1e6:.1f}M parameters ({model_cfg.num_params(embedding=False) / 1e6:.1f}M non-embedding), "
              f"{flops_per_position / 1e6:.1f} MFLOP per position; {world} process(es) on {device.type}, {c['dtype']}")
        print(f"weights + gradients + AdamW moments (fp32): ~{16 * n / (world if c['fsdp'] else 1) / 2**30:.2f} GiB "
              f"per device, before activations")
        phase1 = (f"steps 0-{switch - 1}: phase 1 (s={s}, mode={mode}, weights={c['weights']}), rows of "
                  f"{tst.data_tokens_per_row(T, s, 1, mode) + 1} tokens; " if switch else "no superposition phase; ")
        print(f"{phase1}steps {switch}-{c['max_steps'] - 1}: phase 2, rows of {T + 1}. "
              f"{rows_per_step} rows x {T} positions per step ({grad_accum} micro-step{'s' * (grad_accum > 1)})")

    # ---- the loop
    step_time, loss_value = time.time(), float("nan")
    for step in range(start_step, c["max_steps"]):
        phase = tst.phase(step, c["r"], c["max_steps"], s)  # TST
        if step == switch and switch > 0:  # TST: the hard switch to next-token training
            if master:
                print(f"step {step}: switching to phase 2 (next-token prediction)")
            if c["reinit_at_switch"]:
                with torch.no_grad():
                    for p in {raw_model.embed.weight, raw_model.lm_head.weight}:
                        p.normal_(0.0, model_cfg.init_std)
                        optimizer.state.pop(p, None)
            if c["reset_optimizer_at_switch"]:
                optimizer.state.clear()
        row_tokens = tst.data_tokens_per_row(T, s, phase, mode)  # TST
        lr = lr_at(step, c)
        for group in optimizer.param_groups:
            group["lr"] = lr

        loss_sum = torch.zeros((), device=device)
        aux_sum = torch.zeros((), device=device)
        for micro in range(grad_accum):
            last = micro == grad_accum - 1
            if ddp and not c["fsdp"]:
                model.require_backward_grad_sync = last  # all-reduce gradients once per step
            elif c["fsdp"]:
                raw_model.set_requires_gradient_sync(last)
            rows = train_loader.next_rows(row_tokens)
            if device.type == "cuda":
                rows = rows.pin_memory().to(device, non_blocking=True)
            x, y = tst.batch(rows, s, phase, mode)  # TST: bags and next-bag targets in phase 1
            weights = bag_weights if y.size(-1) > 1 else token_weight  # TST
            with autocast:
                logits, aux_loss = model(x, return_aux_loss=True)
            loss = tst.mce_loss(logits.float(), y, weights)  # MCE in phase 1, plain CE in phase 2
            ((loss + aux_loss) / grad_accum).backward()
            loss_sum += loss.detach()
            aux_sum += aux_loss.detach()
        grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), c["grad_clip"] or math.inf)  # 0: no clipping
        if hasattr(grad_norm, "full_tensor"):  # a DTensor under FSDP
            grad_norm = grad_norm.full_tensor()
        stats = torch.stack([loss_sum, aux_sum]) / grad_accum
        if world > 1:
            dist.all_reduce(stats)
            stats /= world
        loss_value, aux_value, grad_norm = stats[0].item(), stats[1].item(), grad_norm.item()
        if not (math.isfinite(loss_value) and math.isfinite(grad_norm)):
            raise FloatingPointError(f"step {step}: loss {loss_value}, grad norm {grad_norm}; stopping before the "
                                     f"update, so the last checkpoint in {c['out_dir']} is good (lower lr?)")
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if model_cfg.n_experts:
            expert_load = raw_model.pop_expert_load()
            if model_cfg.balance == "bias":
                raw_model.update_expert_bias(expert_load)

        # ---- accounting and logs
        now = time.time()
        dt, step_time = now - step_time, now
        positions, data_tokens = rows_per_step * T, rows_per_step * row_tokens
        totals["positions"] += positions
        totals["data_tokens"] += data_tokens
        totals["flops"] += flops_per_position * positions
        record = {"step": step, "phase": phase, "loss": loss_value, "lr": lr, "grad_norm": grad_norm, **totals,
                  "tokens_per_sec": positions / dt, "data_tokens_per_sec": data_tokens / dt,
                  "mfu": flops_per_position * positions / dt / (peak * world) if peak else None, "dt": dt}
        if model_cfg.n_experts:
            share = expert_load / expert_load.sum(-1, keepdim=True)
            record.update(aux_loss=aux_value, expert_load_max=share.max().item() * model_cfg.n_experts,
                          expert_load_min=share.min().item() * model_cfg.n_experts)
        done = step + 1
        if done % c["eval_interval"] == 0 or done == c["max_steps"] or done == switch:
            record["val_loss"] = estimate_val_loss(model, c, rank, world, device, autocast)
            step_time = time.time()  # evaluation time is not training time
        if master:
            log_file.write(json.dumps(record) + "\n")
            log_file.flush()
            if c["wandb_project"]:
                wandb.log(record, step=step)
            if step % c["log_interval"] == 0 or "val_loss" in record:
                print(f"step {step:6d} | phase {phase} | loss {loss_value:.4f} ({'MCE' if phase == 1 else 'CE'})"
                      + (f" | val {record['val_loss']:.4f}" if "val_loss" in record else "")
                      + f" | lr {lr:.2e} | grad {grad_norm:.2f} | {record['tokens_per_sec']:,.0f} pos/s"
                      + f" {record['data_tokens_per_sec']:,.0f} data tok/s"
                      + (f" | mfu {100 * record['mfu']:.1f}%" if peak else "") + f" | {1000 * dt:.0f} ms")

        # ---- checkpoints: every ckpt_interval steps, at the switch and at the end
        if done % c["ckpt_interval"] == 0 or done == c["max_steps"] or (done == switch):
            rngs = [None] * world
            if world > 1:
                dist.all_gather_object(rngs, rng_state())
            else:
                rngs = [rng_state()]
            train_state = {"model_config": model_cfg.to_dict(), "config": c, "step": done, "phase": phase,
                           "loader": train_loader.state_dict(), "totals": dict(totals), "loss": loss_value, "rng": rngs}
            path = save_checkpoint(c, done, raw_model, optimizer, train_state, switch, rank)
            if master and done == switch:
                print(f"saved the phase-switch checkpoint {path}")
    if master:
        log_file.close()
        print(f"done: {c['max_steps']} steps, {totals['positions']:,} positions, {totals['data_tokens']:,} data tokens, "
              f"final val loss {record.get('val_loss', float('nan')):.4f}")
    if ddp:
        dist.destroy_process_group()
    return raw_model


if __name__ == "__main__":
    try:
        main(sys.argv[1:])
    except (ValueError, FileNotFoundError, FileExistsError, RuntimeError, FloatingPointError) as e:
        if int(os.environ.get("RANK", 0)) == 0:
            print(f"error: {e}", file=sys.stderr)
        sys.exit(1)
