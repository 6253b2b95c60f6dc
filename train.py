"""
Pre-training with Token Superposition Training: every stage in one process.

    python train.py config/tiny_tst.py                          # CPU, offline, minutes
    python train.py config/270m_tst.py --batch_size=32          # one GPU; --key=value overrides any setting
    torchrun --nproc_per_node=8 train.py -- config/270m_tst.py  # DDP on one node (FSDP2 with fsdp=True)
    python train.py config/tiny_tst.py --resume=True            # continue out_dir's run, exactly
    python train.py config/tiny_tst.py --init_from=out/tiny_tst/ckpt_0000180.pt --out_dir=out/branch  # branch a run
    python train.py config/270m_tst.py --plan                   # what the run will cost, without running it
    python train.py --help                                      # every setting, its default and meaning

The Schedule in tst.py says what each step does: read bags of s tokens and predict the next bag, or ordinary next-token
training. The lines whose comment starts with TST are the method's whole footprint here; deleted (with tst.py and the
lines so marked in model.py) they leave a plain pre-training script. Where a TST line assigns a name that the line
above it also assigns, the line above is the plain trainer's value and the TST line replaces it.
"""

import ast
import contextlib
import json
import math
import os
import random
import re
import shlex
import signal
import sys
import time
from dataclasses import dataclass, fields
from pathlib import Path

import torch
import torch.distributed as dist

import checkpoint
import cli
import data
import tst  # TST
from cli import UserError
from model import ModelConfig, Transformer

# -----------------------------------------------------------------------------
# Every setting, with its default: a baseline on the offline corpus. A config file is plain Python that assigns some
# of these names; --key=value on the command line overrides them and must keep the default's type.
DEFAULTS = dict(
    out_dir="out/run",  # checkpoints, config.json, log.jsonl
    seed=1337,  # model initialisation, data order, everything random
    # data: a folder of shards written by data.py, which records its tokenizer; only the offline corpus (data_source
    # "stdlib") is prepared here when missing, anything else is prepared with the command printed
    data_dir="data/stdlib_bytes",  # the prepared data folder
    data_source="stdlib",  # what data.py prepares data_dir from (a SOURCE of python data.py)
    tokenizer="bytes",  # must be the one data_dir was prepared with
    # batch: positions per row, rows per micro-batch per process, positions per optimizer step
    seq_len=128,  # T: positions the transformer sees per row, in every stage
    batch_size=16,  # rows per micro-batch per process
    global_batch_tokens=0,  # positions per optimizer step (gradient accumulation fills it); 0 = one micro-batch
    max_steps=600,  # optimizer steps of the whole run, every stage
    # AdamW and one Warmup-Stable-Decay schedule over all max_steps
    lr=3e-3,  # peak learning rate
    warmup_steps=30,  # linear warm-up from 0
    decay_frac=0.1,  # fraction of max_steps at the end that decays linearly to 0
    weight_decay=0.1,  # on matrices and embeddings only
    beta1=0.9,  # AdamW
    beta2=0.95,  # AdamW
    grad_clip=1.0,  # clip the gradient norm at this; 0 = no clipping
    # evaluation, logging, checkpoints
    eval_interval=100,  # held-out next-token loss every eval_interval steps, at every stage boundary and at the end
    eval_tokens=65536,  # positions scored per evaluation: fixed rows from the start of the val split
    log_interval=10,  # steps between console lines; log.jsonl gets every step
    ckpt_interval=200,  # steps between checkpoints
    keep_last=2,  # checkpoints kept, besides the one at each stage boundary
    resume=False,  # continue the run in out_dir from its newest checkpoint
    init_from="",  # start a new run from this checkpoint (a ckpt file or folder, or a run's out_dir)
    init_weights_only=False,  # with init_from: its weights only, at step 0 (a warm start)
    sample_interval=0,  # print and log a sample every this many steps; 0 = never
    sample_prompt="",  # what samples continue
    sample_tokens=64,  # tokens per sample
    sample_temperature=0.0,  # 0 = greedy; sampling is seeded and leaves training's random numbers alone
    wandb_project="",  # also log to Weights & Biases (pip install wandb; WANDB_MODE=offline works)
    wandb_run_name="",  # default: wandb's
    tensorboard=False,  # also log to out_dir/tensorboard (pip install tensorboard)
    # system
    device="auto",  # auto | cpu | cuda
    dtype="auto",  # auto (bfloat16 on CUDA, float32 on CPU) | float32 | bfloat16
    compile=False,  # torch.compile each transformer block
    fsdp=False,  # FSDP2 (per-block sharding, bf16 parameters, fp32 gradient reduction) instead of DDP
    peak_flops=0.0,  # per-device peak FLOP/s for MFU; 0 = 989e12 (H100/H200 dense bf16) on CUDA, none on CPU
)
DEFAULTS.update(tst.DEFAULTS)  # TST: s, r, s_schedule, tst_mode, bag_loss, bag_weights, reinit_at_switch
# The model's settings are ModelConfig's fields, under the same names (vocab_size 0 = the tokenizer's).
MODEL_KEYS = [f.name for f in fields(ModelConfig)]
DEFAULTS.update({k: v for k, v in ModelConfig().to_dict().items() if k != "vocab_size"}, vocab_size=0)
# Settings a resumed run may change; every other one must match the checkpoint's.
RESUMABLE_KEYS = {"out_dir", "resume", "eval_interval", "eval_tokens", "log_interval", "ckpt_interval", "keep_last",
                  "compile", "device", "peak_flops", "data_dir", "sample_interval", "sample_prompt", "sample_tokens",
                  "sample_temperature", "wandb_project", "wandb_run_name", "tensorboard"}
# Settings that give a checkpoint its meaning: a run started from it (init_from) must keep them.
IDENTITY_KEYS = MODEL_KEYS + ["tokenizer"]


def parse_config(argv):
    """Defaults <- config files <- --key=value, each key known and each value of its default's type."""
    config = dict(DEFAULTS)

    def assign(key, value, where):
        if key not in DEFAULTS:
            raise UserError(f"{where}: unknown setting {key!r}; python train.py --help lists them")
        default = DEFAULTS[key]
        if isinstance(default, float) and isinstance(value, int) and not isinstance(value, bool):
            value = float(value)
        allowed = (str, list) if key == "bag_weights" else (type(default),)
        if not isinstance(value, allowed) or isinstance(value, bool) != isinstance(default, bool):
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
    c = config

    def require(ok, message):
        if not ok:
            raise UserError(message)

    require(c["out_dir"].strip() != "", "out_dir is empty: name the folder for checkpoints and logs")
    require(0 <= c["seed"] < 2**32, f"seed={c['seed']}: must be in [0, 2**32)")
    for key in ("max_steps", "seq_len", "batch_size", "eval_interval", "log_interval", "ckpt_interval", "keep_last",
                "dim", "n_layers", "n_heads", "n_kv_heads", "max_seq_len", "sample_tokens"):
        require(c[key] >= 1, f"{key}={c[key]}: must be >= 1")
    for key in ("global_batch_tokens", "warmup_steps", "vocab_size", "sample_interval"):
        require(c[key] >= 0, f"{key}={c[key]}: must be >= 0")
    for key in ("lr", "init_std", "norm_eps", "rope_theta"):
        require(0 < c[key] < math.inf, f"{key}={c[key]}: must be a number > 0")
    for key in ("weight_decay", "grad_clip", "peak_flops", "sample_temperature"):
        require(0 <= c[key] < math.inf, f"{key}={c[key]}: must be a number >= 0")
    for key in ("beta1", "beta2"):
        require(0 <= c[key] < 1, f"{key}={c[key]}: must be in [0, 1)")
    require(c["seq_len"] <= c["max_seq_len"], f"seq_len={c['seq_len']} exceeds max_seq_len={c['max_seq_len']}")
    require(0 <= c["decay_frac"] <= 1, f"decay_frac={c['decay_frac']}: must be in [0, 1]")
    require(c["warmup_steps"] <= c["max_steps"] - round(c["decay_frac"] * c["max_steps"]),
            f"warmup_steps={c['warmup_steps']}: must fit before the decay (max_steps={c['max_steps']}, "
            f"decay_frac={c['decay_frac']})")
    require(c["device"] in ("auto", "cpu", "cuda"), f"device={c['device']!r}: use auto, cpu or cuda")
    require(c["dtype"] in ("auto", "float32", "bfloat16"), f"dtype={c['dtype']!r}: use auto, float32 or bfloat16")
    require(c["eval_tokens"] >= c["seq_len"],
            f"eval_tokens={c['eval_tokens']}: an evaluation scores at least one row of seq_len={c['seq_len']}")
    rows_tokens = c["batch_size"] * c["seq_len"] * world_size
    require(c["global_batch_tokens"] % rows_tokens == 0,
            f"global_batch_tokens={c['global_batch_tokens']} is not a multiple of batch_size * seq_len * processes "
            f"= {c['batch_size']} * {c['seq_len']} * {world_size} = {rows_tokens}")
    require(not c["init_weights_only"] or c["init_from"], "init_weights_only=True needs init_from=CHECKPOINT")
    try:  # the model's and the method's own checks, which name the setting
        ModelConfig(**{k: c[k] for k in MODEL_KEYS if k != "vocab_size"})
        tst.Schedule(c, c["max_steps"])  # TST
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


def print_help():
    """Every setting with its default and the comment beside it where it is defined, grouped as the source groups
    them: train.py's DEFAULTS, tst.DEFAULTS, then ModelConfig's fields."""
    import inspect
    sources = [("train.py", inspect.getsource(sys.modules[__name__]).split("DEFAULTS = dict(\n", 1)[1])]
    sources.append(("tst.py", inspect.getsource(tst).split("DEFAULTS = dict(\n", 1)[1]))  # TST
    sources.append(("model.py: ModelConfig (vocab_size 0: the data folder's)", inspect.getsource(ModelConfig)))
    print(f"{__doc__.strip()}\n\nSettings: a config file assigns some, --key=value overrides any, keeping the "
          f"default's type.")
    for title, text in sources:
        print(f"\n{title}")
        for line in text.split("\n)\n", 1)[0].split("    def ", 1)[0].splitlines():
            heading = re.fullmatch(r"    # (.*)", line)
            setting = re.fullmatch(r"    (\w+)\s*(?::[^=]*)?=.*?(?:#\s*(.*))?", line)
            if heading:
                print(f"  # {heading.group(1)}")
            elif setting and setting.group(1) in DEFAULTS:
                key = setting.group(1)
                print(f"  {key:<21} {DEFAULTS[key]!r:<22} {setting.group(2) or ''}".rstrip())


# -----------------------------------------------------------------------------
# The run: everything a training step reads, declared once and made by setup()

@dataclass
class Run:
    config: dict  # the resolved settings
    argv: list  # the command line, for the commands that messages suggest
    rank: int
    world: int  # processes
    device: torch.device
    dtype: torch.dtype  # the compute dtype
    model_config: ModelConfig
    raw_model: Transformer  # the model itself: evaluation, checkpoints, the stage switch
    model: torch.nn.Module  # what a training step calls: raw_model, wrapped by DDP where there is one
    optimizer: torch.optim.Optimizer
    autocast: contextlib.AbstractContextManager
    loader: data.TokenLoader  # the train split's rows
    val_rows: torch.Tensor  # the fixed held-out rows, (n, seq_len + 1)
    schedule: tst.Schedule  # TST: which steps read bags of which size
    grad_accum: int  # micro-batches per optimizer step per process
    rows_per_step: int  # rows of all processes and micro-batches in one optimizer step
    flops_per_position: int
    peak_flops: float  # per device, for MFU; 0 = none
    keep_steps: list  # checkpoints kept for good
    start_step: int = 0
    totals: dict = None  # positions, data_tokens, flops so far
    lock: object = None  # out_dir's lock file, held while the run lives (rank 0)
    log: object = None  # log.jsonl, open for appending (rank 0)
    trackers: list = None  # (log, close) pairs of wandb / tensorboard (rank 0)
    tokenizer: data.Tokenizer = None  # for samples

    @property
    def master(self):
        return self.rank == 0


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
    check_config(config, world)
    if distributed:
        if device.type == "cuda":
            dist.init_process_group("nccl", device_id=device)
        else:
            dist.init_process_group("gloo")
    if config["dtype"] == "auto":
        config["dtype"] = "bfloat16" if device.type == "cuda" else "float32"
    return rank, world, device


def all_agree(ok, device):
    """Whether `ok` holds on every rank (one process: whether it holds), so that all ranks stop together."""
    if not dist.is_initialized():
        return ok
    flag = torch.tensor([float(not ok)], device=device)
    dist.all_reduce(flag)
    return flag.item() == 0


def claim_out_dir(config, rank, device):
    """out_dir made and writable, and locked by this run (rank 0), before any data or model is built. A folder held
    by a live run is refused on every rank, by name."""
    out_dir = Path(config["out_dir"])
    problem = None
    if rank == 0:
        try:
            out_dir.mkdir(parents=True, exist_ok=True)
            if not os.access(out_dir, os.W_OK | os.X_OK):
                problem = f"out_dir={out_dir} is not writable: choose another out_dir"
        except OSError as e:  # a file in the way, a file above it, a read-only parent
            problem = f"out_dir={out_dir} cannot be made a folder ({e.strerror}: {e.filename}): choose another out_dir"
    lock, held = None, None
    if rank == 0 and problem is None:
        try:
            lock = checkpoint.lock(out_dir)
        except UserError as e:
            held = str(e)
    if not all_agree(problem is None and held is None, device):
        raise UserError(problem or held or f"rank 0 could not claim out_dir={out_dir} (its message is above)")
    return lock


def open_data(config, rank):
    """The data folder's metadata, after checking it fits the run. The folder is the authority on its tokenizer;
    only the offline corpus (stdlib) is prepared here when missing."""
    if not (Path(config["data_dir"]) / "meta.json").exists():
        if config["data_source"] != "stdlib":
            command = shlex.join(["python", "data.py", "--source", config["data_source"], "--tokenizer",
                                  config["tokenizer"], "--out_dir", config["data_dir"]])
            raise UserError(f"no prepared data in data_dir={config['data_dir']}: prepare it first with: {command}")
        if rank == 0:
            print(f"preparing the offline corpus (Python's standard library, tokenizer {config['tokenizer']}) in "
                  f"{config['data_dir']}")
            data.prepare("stdlib", config["tokenizer"], config["data_dir"])
        if dist.is_initialized():
            dist.barrier()
    meta = data.load_meta(config["data_dir"])
    if meta["tokenizer"] != config["tokenizer"]:
        raise UserError(f"tokenizer={config['tokenizer']!r}, but {config['data_dir']} was prepared with "
                        f"{meta['tokenizer']!r}: set tokenizer={meta['tokenizer']!r}, or point data_dir at data "
                        f"prepared with {config['tokenizer']!r}")
    if config["vocab_size"] == 0:
        config["vocab_size"] = meta["vocab_size"]
    return data.check_token_ids(config["data_dir"], config["vocab_size"])  # the ids fit: from meta.json alone


def build_model(config, device, dtype):
    """The model on the device (built on the meta device first: a 10B model never exists in fp32 on every rank's CPU),
    sharded by FSDP2 or wrapped by DDP, its blocks compiled if asked, and its AdamW optimizer."""
    model_config = ModelConfig(**{k: config[k] for k in MODEL_KEYS})
    with torch.device("meta"):
        model = Transformer(model_config)
    model.to_empty(device=device)
    if model_config.tie_embeddings:  # to_empty made new tensors: tie the head to the embedding again
        model.lm_head.weight = model.embed.weight
    model.init_weights()  # on the device, from the seed: the same weights on every rank
    if config["compile"]:  # block by block (as torchtitan): the loss, any Python function of the stage, stays eager
        for block in model.layers:
            block.compile()
    wrapped = model
    if config["fsdp"]:
        from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard
        policy = MixedPrecisionPolicy(param_dtype=dtype, reduce_dtype=torch.float32)
        for block in model.layers:
            fully_shard(block, mp_policy=policy)
        fully_shard(model, mp_policy=policy)
    elif dist.is_initialized():
        # buffers (MoE expert loads) are per rank by design; they are all-reduced where they are read
        options = dict(broadcast_buffers=False)
        options["find_unused_parameters"] = bool(list(model.bag_combiner.parameters()))  # TST: idle after the switch
        wrapped = torch.nn.parallel.DistributedDataParallel(
            model, device_ids=[device.index] if device.type == "cuda" else None, **options)
    matrices = [p for p in model.parameters() if p.dim() >= 2]  # weight decay on matrices and embeddings only
    vectors = [p for p in model.parameters() if p.dim() < 2]
    optimizer = torch.optim.AdamW(
        [{"params": matrices, "weight_decay": config["weight_decay"]}, {"params": vectors, "weight_decay": 0.0}],
        lr=config["lr"], betas=(config["beta1"], config["beta2"]), fused=device.type == "cuda")
    # FSDP2 casts parameters to bf16 itself; otherwise autocast runs the matmuls in bf16 over fp32 weights
    use_autocast = dtype != torch.float32 and not config["fsdp"]
    autocast = torch.autocast(device.type, dtype=dtype) if use_autocast else contextlib.nullcontext()
    return model_config, model, wrapped, optimizer, autocast


def setup(config, argv):
    """Processes and out_dir, then data, model and optimizer, and where the run starts (start)."""
    rank, world, device = setup_processes(config)
    torch.manual_seed(config["seed"])
    random.seed(config["seed"])
    lock = claim_out_dir(config, rank, device)
    try:
        run = build_run(config, argv, rank, world, device)
        run.lock = lock
        start(run)
    except BaseException:
        if lock:
            lock.close()  # out_dir is free again, even for a caller that goes on (a test, a notebook)
        raise
    return run


def build_run(config, argv, rank, world, device):
    """The data (checked against the model: rows that fit, token ids in the vocabulary), the model and optimizer."""
    meta = open_data(config, rank)
    T = config["seq_len"]
    schedule = tst.Schedule(config, config["max_steps"])  # TST
    window = T  # the loader's windows of text, T tokens (and a label) to a row
    window = schedule.window(T)  # TST: windows that rows of s*T and of T tokens divide evenly
    loader = data.TokenLoader(config["data_dir"], "train", config["batch_size"], window=window, seed=config["seed"],
                              rank=rank, world_size=world)
    val_rows = data.validation_rows(config["data_dir"], T, config["eval_tokens"] // T)  # checks the val shards
    dtype = getattr(torch, config["dtype"])
    model_config, raw_model, model, optimizer, autocast = build_model(config, device, dtype)
    grad_accum = max(1, config["global_batch_tokens"] // (config["batch_size"] * T * world))
    run = Run(config=config, argv=argv, rank=rank, world=world, device=device, dtype=dtype, model_config=model_config,
              raw_model=raw_model, model=model, optimizer=optimizer, autocast=autocast, loader=loader,
              val_rows=val_rows,
              schedule=schedule,  # TST
              grad_accum=grad_accum, rows_per_step=config["batch_size"] * grad_accum * world,
              flops_per_position=model_config.flops_per_position(T),
              peak_flops=config["peak_flops"] or (989e12 if device.type == "cuda" else 0.0), keep_steps=[],
              totals={"positions": 0, "data_tokens": 0, "flops": 0})
    run.keep_steps = schedule.boundaries  # TST: the checkpoint at each switch (the paper's phase-1 checkpoint)
    if config["sample_interval"]:
        run.tokenizer = data.get_tokenizer(meta["tokenizer"])
    return run


def start(run):
    """Where the run starts: from scratch, resumed from out_dir, or branched from another run's checkpoint
    (init_from); then config.json, log.jsonl and the trackers (rank 0)."""
    config, out_dir = run.config, Path(run.config["out_dir"])
    if config["resume"]:
        start_from_checkpoint(run, checkpoint.newest(out_dir), resume=True)
    elif any(out_dir.glob("ckpt_*.pt")):
        raise UserError(f"out_dir={out_dir} holds another run's checkpoints: continue it with --resume=True, or give "
                        f"this run a new out_dir")
    elif config["init_from"]:
        source = Path(config["init_from"])
        start_from_checkpoint(run, checkpoint.newest(source) if (source / "log.jsonl").exists() else source)
    if run.master:
        (out_dir / "config.json").write_text(json.dumps(config, indent=2) + "\n")
        if not config["resume"]:
            (out_dir / "log.jsonl").unlink(missing_ok=True)  # a run that died before its first checkpoint
        run.log = open(out_dir / "log.jsonl", "a")
        run.trackers = open_trackers(config)


def start_from_checkpoint(run, path, resume=False):
    """Continue from checkpoint `path`: this run (resume: every setting that changes what it computes must match) or
    a new run branched from another's (init_from: the model's shape and the tokenizer must match, and the settings
    that differ are printed). Restores weights, optimizer moments, step, loader position, RNG states and totals, so a
    branch with unchanged settings repeats the original's later steps exactly; init_weights_only: the weights alone."""
    config = run.config
    state = checkpoint.read_train_state(path)
    old = state["config"]
    weights_only = not resume and config["init_weights_only"]
    fixed = (set(DEFAULTS) - RESUMABLE_KEYS) if resume else IDENTITY_KEYS + ["fsdp"] * (not weights_only)
    differing = {k: (old.get(k), config[k]) for k in sorted(fixed) if old.get(k) != config[k]}
    if differing:
        lines = "; ".join(f"{k}: checkpoint {a!r}, this run {b!r}" for k, (a, b) in differing.items())
        advice = ("resume with the checkpoint's settings, or branch a new run from it with --init_from" if resume
                  else "a branch keeps the model's shape and the tokenizer" + ("" if weights_only else
                       "; init_weights_only=True takes the weights alone"))
        raise UserError(f"checkpoint {path} was written by a run with other settings ({lines}): {advice}")
    checkpoint.load_into(path, state, run.raw_model, None if weights_only else run.optimizer)
    if run.master and not resume:
        changed = {k: (old.get(k), v) for k, v in config.items()
                   if old.get(k) != v and k not in ("out_dir", "resume", "init_from", "init_weights_only")}
        what = "its weights, at step 0" if weights_only else f"step {state['step']}: weights, optimizer, data, RNG"
        print(f"init_from {path}: {what}; settings changed: "
              + (", ".join(f"{k} {a!r} -> {b!r}" for k, (a, b) in changed.items()) or "none"))
    if weights_only:
        return
    try:
        run.loader.load_state_dict(state["loader"])
    except UserError as e:
        raise UserError(f"{e}" + ("" if resume else "; or take the weights alone: init_weights_only=True")) from None
    set_rng_state(state["rng"][run.rank] if run.rank < len(state["rng"]) else state["rng"][0])
    run.totals, run.start_step = state["totals"], state["step"]
    if run.master and resume:
        print(f"resumed from {Path(path).name} at step {run.start_step}")
        truncate_log(Path(config["out_dir"]) / "log.jsonl", run.start_step)
    if run.master and not resume and old["max_steps"] != config["max_steps"] and run.start_step < config["max_steps"]:
        print(f"max_steps {old['max_steps']} -> {config['max_steps']}: the learning-rate schedule (and every stage) is "
              f"computed over {config['max_steps']} steps, so step {run.start_step} runs at lr "
              f"{lr_at(run.start_step, config):.3g}; the original's last step ran at "
              f"{lr_at(old['max_steps'] - 1, old):.3g}; the decay now starts at step "
              f"{config['max_steps'] - round(config['decay_frac'] * config['max_steps'])}")


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


def save(run, done):
    rngs = [None] * run.world
    if dist.is_initialized():
        dist.all_gather_object(rngs, rng_state())
    else:
        rngs = [rng_state()]
    train_state = {"model_config": run.model_config.to_dict(), "config": run.config, "step": done,
                   "loader": run.loader.state_dict(), "totals": dict(run.totals), "rng": rngs}
    return checkpoint.save(run.config["out_dir"], done, run.raw_model, run.optimizer, train_state,
                           fsdp=run.config["fsdp"], keep_last=run.config["keep_last"], keep_steps=run.keep_steps)


# -----------------------------------------------------------------------------
# Training and evaluation

def train_step(run, step, stop_requested=False):
    """One optimizer step over grad_accum micro-batches per process -> (its log record, whether any process was asked
    to stop: the flag travels with the loss's all-reduce, so that every rank stops after the same step)."""
    t0 = time.time()
    config, T = run.config, run.config["seq_len"]
    row_tokens = T  # data tokens a row consumes (+1, the label of its last position)
    stage = run.schedule.stage(step)  # TST
    row_tokens = stage.data_tokens_per_row(T)  # TST: s*T when bags come in
    lr = lr_at(step, config)
    for group in run.optimizer.param_groups:
        group["lr"] = lr
    sums = torch.tensor([0.0, 0.0, float(stop_requested)], device=run.device)  # loss, aux_loss, stop
    for micro in range(run.grad_accum):
        last = micro == run.grad_accum - 1
        if config["fsdp"]:
            run.raw_model.set_requires_gradient_sync(last)
        elif run.model is not run.raw_model:
            run.model.require_backward_grad_sync = last  # all-reduce gradients once per step
        rows = run.loader.next_rows(row_tokens)
        if run.device.type == "cuda":
            rows = rows.pin_memory().to(run.device, non_blocking=True)
        inputs, targets, loss_fn = rows[:, :-1], rows[:, 1:], None  # loss_fn None: next-token cross-entropy
        inputs, targets, loss_fn = stage.batch(rows)  # TST: bags in, the next bag out, scored by the bag loss
        with run.autocast:
            loss, aux_loss = run.model(inputs, targets, loss_fn)
        ((loss + aux_loss) / run.grad_accum).backward()
        sums[:2] += torch.stack([loss.detach(), aux_loss.detach()])
    grad_norm = torch.nn.utils.clip_grad_norm_(run.model.parameters(), config["grad_clip"] or math.inf)
    if hasattr(grad_norm, "full_tensor"):  # a DTensor under FSDP
        grad_norm = grad_norm.full_tensor()
    sums[:2] /= run.grad_accum
    if dist.is_initialized():
        dist.all_reduce(sums)
        sums[:2] /= run.world
    loss, aux_loss, grad_norm = sums[0].item(), sums[1].item(), grad_norm.item()
    if not (math.isfinite(loss) and math.isfinite(grad_norm)):
        raise UserError(diverged(run, step, loss, grad_norm))
    run.optimizer.step()
    run.optimizer.zero_grad(set_to_none=True)
    positions, data_tokens = run.rows_per_step * T, run.rows_per_step * row_tokens
    run.totals["positions"] += positions
    run.totals["data_tokens"] += data_tokens
    run.totals["flops"] += run.flops_per_position * positions
    record = {"step": step, "loss": loss, "lr": lr, "grad_norm": grad_norm, **run.totals}
    record.update(phase=1 if stage.superposition else 2, s=stage.s)  # TST: the loss is a bag loss in phase 1
    if run.model_config.n_experts:
        expert_load = run.raw_model.pop_expert_load()
        if run.model_config.balance == "bias":
            run.raw_model.update_expert_bias(expert_load)
        share = expert_load / expert_load.sum(-1, keepdim=True) * run.model_config.n_experts
        record.update(aux_loss=aux_loss, expert_load_max=share.max().item(), expert_load_min=share.min().item())
    dt = time.time() - t0
    mfu = run.flops_per_position * positions / dt / (run.peak_flops * run.world) if run.peak_flops else None
    record.update(positions_per_sec=positions / dt, data_tokens_per_sec=data_tokens / dt, dt=dt, mfu=mfu)
    return record, sums[2].item() > 0


def command(argv, *extra):
    """The command line that runs this script again with argv, the settings in `extra` replacing theirs; under
    torchrun, with torchrun (and the `--` that keeps its parser off the script's settings)."""
    keys = tuple(e.split("=", 1)[0] + "=" for e in extra)
    kept = [a for a in argv if not a.startswith(keys)] + list(extra)
    script = os.path.relpath(__file__)
    script = script if not script.startswith("..") else __file__
    if dist.is_initialized():
        launch = ["torchrun", f"--nproc_per_node={os.environ.get('LOCAL_WORLD_SIZE', 1)}", script, "--"]
    else:
        launch = ["python", script]
    return shlex.join(launch + kept)


def diverged(run, step, loss, grad_norm):
    """The one line for a NaN or infinite loss or gradient: the command that branches from the last good checkpoint
    with a lower learning rate, or that starts again with one."""
    out_dir = Path(run.config["out_dir"])
    lower = f"--lr={run.config['lr'] / 4:g}"
    if (out_dir / "ckpt.pt").exists():
        last = (out_dir / "ckpt.pt").resolve()
        branch = command(run.argv, f"--init_from={last}", lower, f"--out_dir={out_dir}_lr", "--resume=False")
        advice = f"the last checkpoint ({last.name}) is from before it: branch from it with a lower lr: {branch}"
    else:
        advice = f"no checkpoint was written yet: start again with a lower lr: {command(run.argv, lower)}"
    return (f"step {step}: loss {loss}, grad norm {grad_norm}: the run diverged and stopped before the update; "
            f"{advice}")


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
    if dist.is_initialized():
        dist.all_reduce(total)
    return (total[0] / total[1]).item()


@torch.no_grad()
def sample(run, step):
    """A continuation of sample_prompt, on every rank (FSDP gathers weights in every forward), from a generator of its
    own: training's random numbers are untouched, so a run with samples trains exactly as one without."""
    c, tok = run.config, run.tokenizer
    generator = torch.Generator(device=run.device).manual_seed(c["seed"] + step)
    with run.autocast:
        new = run.raw_model.generate(tok.document_prefix + tok.encode(c["sample_prompt"]), c["sample_tokens"],
                                     c["sample_temperature"], generator=generator, stop=tok.eot)
    return c["sample_prompt"] + tok.decode([t for t in new if t != tok.eot])


# -----------------------------------------------------------------------------
# Logs: log.jsonl (what tools/compare.py reads), the console, and optionally wandb or tensorboard

def open_trackers(config):
    """wandb (wandb_project set) and tensorboard (tensorboard=True), each a (log(record), close) pair; none by
    default. A tracker asked for but not installed is refused at start-up, before any step."""
    trackers = []
    if config["wandb_project"]:
        try:
            import wandb
        except ImportError:
            raise UserError("wandb_project is set but wandb is not installed: pip install wandb, or leave "
                            "wandb_project empty") from None
        wandb.init(project=config["wandb_project"], name=config["wandb_run_name"] or None, config=config,
                   dir=config["out_dir"])
        trackers.append((lambda record: wandb.log(numbers(record), step=record["step"]), wandb.finish))
    if config["tensorboard"]:
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError:
            raise UserError("tensorboard=True but tensorboard is not installed: pip install tensorboard, or set "
                            "tensorboard=False") from None
        writer = SummaryWriter(str(Path(config["out_dir"]) / "tensorboard"))

        def log(record):
            for key, value in numbers(record).items():
                writer.add_scalar(key, value, record["step"])
        trackers.append((log, writer.close))
    return trackers


def numbers(record):
    return {k: v for k, v in record.items() if isinstance(v, (int, float)) and not isinstance(v, bool) and k != "step"}


def log_record(run, record):
    try:
        run.log.write(json.dumps(record) + "\n")
        run.log.flush()
    except OSError as e:
        raise UserError(f"writing {run.log.name} failed ({e}): free space, then --resume=True continues from the "
                        f"last checkpoint") from e
    for log, _ in run.trackers:
        log(record)


def print_record(run, record, elapsed, steps_done_here):
    """step/total | stage | loss | val | lr | grad | throughput | MFU | ms | elapsed, ETA (from this process's pace)."""
    N = run.config["max_steps"]
    step = record["step"]
    parts = [f"step {step:{len(str(N))}d}/{N}"]
    parts.append(run.schedule.label(step))  # TST: which stage (nothing for a baseline)
    parts.append(f"loss {record['loss']:.4f}")
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


def print_banner(run):
    config, T, n = run.config, run.config["seq_len"], run.model_config.num_params()
    val_tokens = data.load_meta(config["data_dir"])["val_tokens"]
    print(json.dumps(config))
    active = run.model_config.num_params(active=True)
    print(f"model: {n / 1e6:.1f}M parameters ({run.model_config.num_params(embedding=False) / 1e6:.1f}M "
          f"non-embedding" + (f", {active / 1e6:.1f}M active" if active != n else "") + f"), "
          f"{run.flops_per_position / 1e6:.1f} MFLOP per position; {run.world} process(es) on {run.device.type}, "
          f"{config['dtype']}")
    print(f"{run.rows_per_step} rows x {T} positions per step ({run.grad_accum} micro-step(s) of "
          f"{config['batch_size']} rows per process); validation: {len(run.val_rows)} rows = "
          f"{len(run.val_rows) * T:,} positions of the {val_tokens:,}-token val split")
    print(run.schedule.describe(T))  # TST


# -----------------------------------------------------------------------------
# Preemption: SIGTERM (what a cluster sends before it kills a job) and Ctrl-C finish the step, save, and stop

@contextlib.contextmanager
def stop_signals():
    """Within: SIGTERM and SIGINT append to the list it yields (a second Ctrl-C stops at once). The handlers that were
    there before come back after, so that processes started later (data.py's tokenizer pool) die on SIGTERM."""
    received = []

    def handler(signum, frame):
        if signum == signal.SIGINT and received:
            raise KeyboardInterrupt
        received.append(signum)
    before = {signum: signal.signal(signum, handler) for signum in (signal.SIGTERM, signal.SIGINT)}
    try:
        yield received
    finally:
        for signum, previous in before.items():
            signal.signal(signum, previous)


def stop(run, done, signum, path):
    """After the step reached is saved (at `path`): say how to continue, and exit with 128 + the signal's number, as a
    process killed by it would."""
    name = signal.Signals(signum).name if signum else "a signal on another rank"
    if run.master:
        print(f"stopped by {name} after step {done - 1}: saved {path}; continue with: "
              f"{command(run.argv, '--resume=True')}", flush=True)
    raise SystemExit(128 + (signum or signal.SIGTERM))


# -----------------------------------------------------------------------------
# --plan: what a run will cost, from its settings alone (offline, in seconds: the model is built on the meta device)

def plan(config, world):
    """Print parameters, FLOPs, positions and data tokens per stage, what the data folder must hold, and an estimate
    of each device's memory for `world` processes."""
    GB = 1e9
    meta = data.load_meta(config["data_dir"]) if (Path(config["data_dir"]) / "meta.json").exists() else None
    if config["vocab_size"] == 0:
        config["vocab_size"] = meta["vocab_size"] if meta else data.get_tokenizer(config["tokenizer"]).n_vocab
    check_config(config, world)
    cfg = ModelConfig(**{k: config[k] for k in MODEL_KEYS})
    with torch.device("meta"):
        n = sum(p.numel() for p in Transformer(cfg).parameters())
    active, T, B = cfg.num_params(active=True), config["seq_len"], config["batch_size"]
    grad_accum = max(1, config["global_batch_tokens"] // (B * T * world))
    rows = B * grad_accum * world
    per_position = cfg.flops_per_position(T)
    print(f"model: {n:,} parameters ({cfg.num_params(embedding=False):,} non-embedding"
          + (f", {active:,} active per position" if active != n else "") + f"); {per_position / 1e9:.3f} GFLOP per "
          f"position at T={T}, {per_position * rows * T:.3e} FLOP per step")
    print(f"batch: {rows:,} rows x {T} positions = {rows * T:,} positions per step ({world} process(es) x {B} rows x "
          f"{grad_accum} micro-step(s))")
    N = config["max_steps"]
    stages = [(0, N, T, "next-token training")]  # (start, end, data tokens per row, what)
    stages = [(st.start, st.end, st.data_tokens_per_row(T), st.name) for st in tst.Schedule(config, N).stages]  # TST
    total_data = 0
    for start, end, row_tokens, what in stages:
        steps = end - start
        total_data += steps * rows * row_tokens
        print(f"  steps {start:,}-{end - 1:,} ({steps:,}, {what}): {steps * rows * T:,} positions, "
              f"{steps * rows * row_tokens:,} data tokens")
    positions = config["max_steps"] * rows * T
    print(f"total: {config['max_steps']:,} steps, {positions:,} positions, {total_data:,} data tokens, "
          f"{per_position * positions:.3e} FLOP")
    if meta:
        print(f"data: {config['data_dir']} holds {meta['train_tokens']:,} train tokens: the run reads "
              f"{total_data / meta['train_tokens']:.2f} epochs of it")
    else:
        print(f"data: {config['data_dir']} is missing; for one pass it must hold {total_data:,} train tokens "
              f"({total_data / GB:.1f}B): python data.py --source {config['data_source']} --tokenizer "
              f"{config['tokenizer']} --out_dir {config['data_dir']} --max_tokens {total_data:.3g}")
    # dtype auto is planned as on a GPU (bf16), where the runs a plan is for happen; --dtype=float32 plans a CPU run
    on_cpu = config["device"] == "cpu" or config["dtype"] == "float32"
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
    from model import HEAD_CHUNK_LOGITS
    chunk = min(HEAD_CHUNK_LOGITS, positions * cfg.vocab_size) * 4 * 4 + 4 * cfg.vocab_size * cfg.dim
    full_logits = positions * cfg.vocab_size * (dtype_bytes + 3 * 4)
    print(f"memory per device ({how}, {'bf16' if dtype_bytes == 2 else 'fp32'} compute): "
          + ", ".join(f"{k} {v / GB:.2f} GB" for k, v in states.items()))
    print(f"  activations of a micro-batch of {config['batch_size']} x {config['seq_len']} positions: ~"
          f"{activations / GB:.2f} GB (eager; compile saves less); the loss, a chunk at a time: ~{chunk / GB:.2f} GB "
          f"(whole logits would take ~{full_logits / GB:.1f} GB)")
    print(f"  total: ~{(sum(states.values()) + activations + chunk) / GB:.1f} GB per device")


# -----------------------------------------------------------------------------

def main(argv):
    if {"-h", "--help"} & set(argv):
        return print_help()
    plan_for = next((a for a in argv if a == "--plan" or a.startswith("--plan=")), None)
    config = parse_config([a for a in argv if a != plan_for])
    if plan_for:
        return plan(config, int(plan_for.partition("=")[2] or os.environ.get("WORLD_SIZE", 1)))
    run = setup(config, argv)
    try:
        if run.start_step >= config["max_steps"]:
            if run.master:
                print(f"{config['out_dir']} is complete: all {config['max_steps']} steps are done, nothing to resume. "
                      f"A longer run is a branch: --init_from={config['out_dir']} --max_steps=N --out_dir=NEW")
            return run.raw_model
        if run.master:
            print_banner(run)
        record = train(run)
        if run.master:
            print(f"done: {config['max_steps']} steps, {run.totals['positions']:,} positions, "
                  f"{run.totals['data_tokens']:,} data tokens, final val loss {record['val_loss']:.4f}")
        return run.raw_model
    finally:
        for _, close in run.trackers or []:
            close()
        for f in (run.log, run.lock):  # the lock too: out_dir is free again, even for a caller that goes on
            if f:
                f.close()
        if dist.is_initialized():
            dist.destroy_process_group()


def train(run):
    """The loop: a step, its evaluation, log lines and checkpoint; a stop signal saves and exits. -> the last record."""
    config = run.config
    started, record = time.time(), None
    with stop_signals() as received:
        for step in range(run.start_step, config["max_steps"]):
            run.schedule.begin_step(step, run.raw_model, run.optimizer, announce=run.master)  # TST: a new stage?
            record, stop_now = train_step(run, step, stop_requested=bool(received))
            done = step + 1
            milestone = done == config["max_steps"]
            milestone = milestone or done in run.schedule.boundaries  # TST: evaluate and save at every switch
            if done % config["eval_interval"] == 0 or milestone:
                record["val_loss"] = evaluate(run)
            if config["sample_interval"] and (done % config["sample_interval"] == 0 or milestone):
                record["sample"] = sample(run, step)
            if run.master:
                log_record(run, record)
                if step % config["log_interval"] == 0 or "val_loss" in record:
                    print_record(run, record, time.time() - started, done - run.start_step)
                if "sample" in record:
                    print(f"sample at step {step}: {record['sample']!r}")
            path = None
            if done % config["ckpt_interval"] == 0 or milestone:
                path = save(run, done)
                if run.master and done in run.keep_steps:
                    print(f"saved {path}, kept for good")
            if stop_now and done < config["max_steps"]:
                stop(run, done, received[0] if received else 0, path or save(run, done))
    return record


if __name__ == "__main__":
    cli.run(main)
