"""
Pre-training with Token Superposition Training: every stage in one process.

    python train.py config/tiny_tst.py                          # CPU, offline, minutes
    python train.py config/270m_tst.py --batch_size=32          # one GPU; --key=value overrides any setting
    torchrun --nproc_per_node=8 train.py -- config/270m_tst.py  # DDP on one node (FSDP2 with fsdp=True)
    python train.py config/tiny_tst.py --resume=True            # continue out_dir's run, exactly
    python train.py config/tiny_tst.py --init_from=out/tiny_tst/ckpt_0000180.pt --out_dir=out/branch  # branch a run
    python train.py --help                                      # every setting, its default and meaning

Read top to bottom: the run's state, its setup, the loop, then one training step and what the loop reports.
The Schedule in tst.py says what each step does: read bags of s tokens and predict the next bag, or ordinary next-token
training. The lines marked "# TST" are the method's whole footprint here; deleted (with tst.py and the lines so marked
elsewhere) they leave a plain pre-training script. A TST line that changes a value (*=, |=, +=, the stage's transform
of a batch) changes the plain trainer's value set on the line above it.
"""

import contextlib
import inspect
import math
import os
import random
import shutil
import signal
import time
import warnings
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.distributed as dist

import cli
import config as settings
import data
import logs
import resume
import tst  # TST
from cli import UserError
from eval import loss_sums
from model import ModelConfig, Transformer
from sample import sample


@dataclass
class Run:
    """Everything a training step reads, made once by setup()."""
    config: dict  # the resolved settings
    argv: list  # the command line, for the commands that messages suggest
    rank: int
    world: int  # processes
    device: torch.device
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
    tokenizer: data.Tokenizer  # for samples
    start_step: int = 0
    totals: dict = None  # positions, data_tokens, flops so far
    lock: object = None  # out_dir's lock file, held while the run lives (rank 0)
    log: object = None  # log.jsonl, open for appending (rank 0)
    trackers: list = ()  # (name, log, close) of wandb / tensorboard (rank 0)

    @property
    def master(self):
        return self.rank == 0


# -----------------------------------------------------------------------------
# Setup: processes, out_dir, data, model and optimizer, then where the run starts

def setup(config, argv):
    rank, world, device = setup_processes(config)
    torch.manual_seed(config["seed"])
    random.seed(config["seed"])
    lock = resume.claim_out_dir(config["out_dir"], rank, device)
    try:
        run = build_run(config, argv, rank, world, device)
        run.lock = lock
        run.start_step, run.totals = resume.start_run(config, run.raw_model, run.optimizer, run.loader, rank)
        if run.master:
            run.log = open(Path(config["out_dir"]) / "log.jsonl", "a")
            run.trackers = logs.open_trackers(config)
    except BaseException:
        if lock:
            lock.close()  # out_dir is free again, even for a caller that goes on (a test, a notebook)
        raise
    return run


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
    if rank:
        warnings.filterwarnings("ignore")  # rank 0 shows each warning once, not once per process
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
    settings.check(config, world)
    if distributed:
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo", device_id=device if device.index
                                is not None else None)
    if config["dtype"] == "auto":
        config["dtype"] = "bfloat16" if device.type == "cuda" else "float32"
    return rank, world, device


def open_data(config, rank):
    """The data folder's meta.json, checked for this run; books and stdlib are prepared here if missing or format 1."""
    folder, source, path = Path(config["data_dir"]), config["data_source"], Path(config["data_dir"], "meta.json")
    meta = data.read_meta(path) if path.exists() else {"source": source, "tokenizer": config["tokenizer"]}
    if meta.get("format", 1) < data.FORMAT:  # no folder, or one that does not say which corpus it holds
        how = data.prepare_command(meta, folder)
        if source not in ("books", "stdlib"):
            raise UserError(f"data_dir={folder} " + ("was prepared by an older prepare.py, which did not record its "
                            "corpus" if path.exists() else "holds no prepared data") + f": prepare it with {how}")
        if rank == 0:
            import prepare  # here: training a prepared folder never needs it
            print(f"preparing the offline corpus in {folder}: {how}")
            prepare.prepare(source, config["tokenizer"], folder, wait=True)  # after a run beside it, if one is at it
        if dist.is_initialized():
            dist.barrier()
    meta = data.load_meta(folder)
    if meta["tokenizer"] != config["tokenizer"]:
        raise UserError(f"tokenizer={config['tokenizer']!r}, but {folder} was prepared with {meta['tokenizer']!r}: "
                        f"set tokenizer={meta['tokenizer']!r}, or point data_dir at data prepared with "
                        f"{config['tokenizer']!r}")
    if config["vocab_size"] == 0:
        config["vocab_size"] = meta["vocab_size"]
    return data.check_token_ids(config["data_dir"], config["vocab_size"])  # the ids fit: from meta.json alone


def build_run(config, argv, rank, world, device):
    meta = open_data(config, rank)
    T, B = config["seq_len"], config["batch_size"]
    schedule = tst.Schedule(config, meta)  # TST: built once, from the settings and the data's facts
    window = T  # the loader's windows of text: T tokens (and a label) to a row
    window *= schedule.window_factor  # TST: so that rows of s*T and of T tokens both divide a window
    loader = data.TokenLoader(config["data_dir"], "train", B, window=window, seed=config["seed"], rank=rank,
                              world_size=world)
    val_rows = data.validation_rows(config["data_dir"], T, config["eval_tokens"] // T)  # checks the val shards
    dtype = getattr(torch, config["dtype"])
    raw_model, model, optimizer, autocast = build_model(config, device, dtype)
    grad_accum = max(1, config["global_batch_tokens"] // (B * T * world))
    return Run(config=config, argv=argv, rank=rank, world=world, device=device, raw_model=raw_model, model=model,
               optimizer=optimizer, autocast=autocast, loader=loader, val_rows=val_rows,
               schedule=schedule,  # TST
               grad_accum=grad_accum, rows_per_step=B * grad_accum * world,
               flops_per_position=raw_model.flops_per_position(T), tokenizer=data.get_tokenizer(meta["tokenizer"]),
               peak_flops=config["peak_flops"] or (989e12 if device.type == "cuda" else 0.0))


def build_model(config, device, dtype):
    """The model on the device (built on the meta device first: a 10B model never exists in fp32 on every rank's CPU),
    sharded by FSDP2 or wrapped by DDP, its blocks compiled if asked, and its AdamW optimizer."""
    with torch.device("meta"):
        model = Transformer(ModelConfig(**{k: config[k] for k in settings.MODEL_KEYS}))
    model.to_empty(device=device)
    if model.cfg.tie_embeddings:  # to_empty made new tensors: tie the head to the embedding again
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
    elif dist.is_initialized():  # buffers (MoE loads) are per rank, all-reduced where read: not synced by forward
        DDP = torch.nn.parallel.DistributedDataParallel  # torch 2.13 renamed its broadcast_buffers forward_sync_buffers
        sync = next(k for k in ("forward_sync_buffers", "broadcast_buffers") if k in inspect.signature(DDP).parameters)
        options = {sync: False, "find_unused_parameters": False}
        options["find_unused_parameters"] = bool(list(model.bag_combiner.parameters()))  # TST: idle in phase 2
        wrapped = DDP(model, device_ids=[device.index] if device.type == "cuda" else None, **options)
    matrices = [p for p in model.parameters() if p.dim() >= 2]  # weight decay on matrices and embeddings only
    vectors = [p for p in model.parameters() if p.dim() < 2]
    optimizer = torch.optim.AdamW(
        [{"params": matrices, "weight_decay": config["weight_decay"]}, {"params": vectors, "weight_decay": 0.0}],
        lr=config["lr"], betas=(config["beta1"], config["beta2"]), fused=device.type == "cuda")
    # FSDP2 casts parameters to bf16 itself; otherwise autocast runs the matmuls in bf16 over fp32 weights
    use_autocast = dtype != torch.float32 and not config["fsdp"]
    autocast = torch.autocast(device.type, dtype=dtype) if use_autocast else contextlib.nullcontext()
    return model, wrapped, optimizer, autocast


# -----------------------------------------------------------------------------
# The loop

def main(argv):
    if {"-h", "--help"} & set(argv):
        return print(__doc__.strip() + "\n\nSettings: a config file assigns some, --key=value overrides any, keeping "
                     "the default's type.\n" + settings.help_text())
    config = settings.load(argv)
    run = setup(config, argv)
    try:
        if run.start_step >= config["max_steps"]:
            extend = (f"--init_from={config['init_from'] or config['out_dir']} --max_steps=N (N > {run.start_step}) "
                      f"--out_dir=NEW")
            if not config["resume"]:  # a branch that would train nothing
                raise UserError(f"init_from={config['init_from']} is at step {run.start_step}, and max_steps="
                                f"{config['max_steps']} leaves nothing to train: {extend}")
            if run.master:
                print(f"{config['out_dir']} is complete: all {config['max_steps']} steps are done, nothing to "
                      f"resume. A longer run is a branch: {extend}")
            return run.raw_model
        if run.master:
            logs.banner(run)
        record = train(run)
        if run.master:
            print(f"done: {config['max_steps']} steps, {run.totals['positions']:,} positions, "
                  f"{run.totals['data_tokens']:,} data tokens, final val loss {record['val_loss']:.4f}")
        return run.raw_model
    finally:
        for *_, close in run.trackers:
            close()
        for f in (run.log, run.lock):  # the lock too: out_dir is free again, even for a caller that goes on
            if f:
                f.close()
        if dist.is_initialized():
            dist.destroy_process_group()


def train(run):
    """Each step, its evaluation, log lines and checkpoint, to the last or an early end (stop, lost) -> its record."""
    config, started, record = run.config, time.time(), None
    keep = []  # steps whose checkpoints are kept for good
    keep += run.schedule.boundaries  # TST: the checkpoint at each switch (the paper's phase-1 checkpoint)
    with cli.stop_signals() as received:  # the signals, then (rank 0) the line of a tracker that failed
        try:
            for step in range(run.start_step, config["max_steps"]):
                run.schedule.begin_step(step, run.raw_model, run.optimizer, announce=run.master)  # TST: a new stage?
                record, stop_now = train_step(run, step, received)
                done = step + 1
                milestone = done == config["max_steps"]
                milestone |= done in run.schedule.boundaries  # TST: evaluate and save at every switch
                if done % config["eval_interval"] == 0 or milestone:
                    record.update(evaluate(run, received))
                    stop_now |= "val_loss" not in record  # abandoned: a stop was asked for, on some rank
                if config["sample_interval"] and not stop_now and (done % config["sample_interval"] == 0 or milestone):
                    record["sample"] = sample_text(run, step)
                if run.master:
                    received += logs.write(run, record)  # a tracker that failed is dropped: the run saves and stops
                    if step % config["log_interval"] == 0 or "val_loss" in record:
                        logs.show(run, record, time.time() - started, done - run.start_step)
                saving = done % config["ckpt_interval"] == 0 or milestone
                path = resume.save_run(run, done, keep_steps=keep) if saving else None
                if path and run.master and done in keep:
                    print(f"saved {path}, kept for good")
                if stop_now or received and done == config["max_steps"]:  # (the last step saves on every rank)
                    stop(run, done, received[0] if received else 0, path or resume.save_run(run, done, keep))
        except RuntimeError as e:  # gloo's error in a collective (NCCL's watchdog ends a process itself)
            if not (dist.is_initialized() and (isinstance(e, dist.DistError) or "gloo/transport" in str(e))):
                raise
            lost(run, step, e)
    return record


# -----------------------------------------------------------------------------
# One optimizer step, and the held-out loss

def train_step(run, step, received=()):
    """One optimizer step over grad_accum micro-batches per process -> (its log record, whether any process was asked
    to stop by then: the flag travels with the loss's all-reduce, so that every rank stops after the same step)."""
    t0 = time.time()
    config, T = run.config, run.config["seq_len"]
    row_tokens = T  # data tokens a row consumes (+1, the label of its last position)
    stage = run.schedule.stage(step)  # TST
    row_tokens *= stage.tokens_per_position  # TST: s*T when bags come in
    lr = settings.lr_at(step, config)
    for group in run.optimizer.param_groups:
        group["lr"] = lr
    sums = torch.zeros(4, device=run.device)  # loss, aux_loss, stop, data tokens read but not trained on
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
        inputs, targets, loss_fn = stage.batch(inputs, targets)  # TST: bags in, the next bag out, the bag loss
        sums[3] += stage.padding(inputs)  # TST: doc_bags' padding
        with run.autocast:
            loss, aux_loss = run.model(inputs, targets, loss_fn)
        ((loss + aux_loss) / run.grad_accum).backward()
        sums[:2] += torch.stack([loss.detach(), aux_loss.detach()])
    grad_norm = torch.nn.utils.clip_grad_norm_(run.model.parameters(), config["grad_clip"] or math.inf)
    if hasattr(grad_norm, "full_tensor"):  # a DTensor under FSDP
        grad_norm = grad_norm.full_tensor()
    sums[:2] /= run.grad_accum
    sums[2] = float(bool(received))
    if dist.is_initialized():
        dist.all_reduce(sums)
        sums[:2] /= run.world
    loss, aux_loss, grad_norm = sums[0].item(), sums[1].item(), grad_norm.item()
    if not (math.isfinite(loss) and math.isfinite(grad_norm)):
        raise UserError(logs.diverged(run, step, loss, grad_norm))
    run.optimizer.step()
    run.optimizer.zero_grad(set_to_none=True)
    positions, data_tokens = run.rows_per_step * T, run.rows_per_step * row_tokens - round(sums[3].item())
    run.totals["positions"] += positions
    run.totals["data_tokens"] += data_tokens
    run.totals["flops"] += run.flops_per_position * positions
    record = {"step": step, "loss": loss, "lr": lr, "grad_norm": grad_norm, **run.totals}
    record.update(phase=1 if stage.superposition else 2, s=stage.s)  # TST: the loss is a bag loss in phase 1
    if run.raw_model.cfg.n_experts:
        record.update(aux_loss=aux_loss, **run.raw_model.balance_experts())
    dt = time.time() - t0
    mfu = run.flops_per_position * positions / dt / (run.peak_flops * run.world) if run.peak_flops else None
    record.update(positions_per_sec=positions / dt, data_tokens_per_sec=data_tokens / dt, dt=dt, mfu=mfu)
    return record, sums[2].item() > 0


@torch.no_grad()
def evaluate(run, received=()):
    """Held-out next-token loss on token input (one scale for every stage and run) over the fixed validation rows,
    split among the processes, so that the figure does not depend on how many there are -> {"val_loss": loss}, or {}
    once a stop is asked for on any rank (the ranks agree before each batch: every rank runs the same forwards)."""
    B, rows = run.config["batch_size"], run.val_rows
    mine = rows[run.rank::run.world]
    batches = -(-len(rows) // (run.world * B))  # the same on every rank: FSDP gathers weights in every forward
    total = torch.zeros(2, dtype=torch.float64, device=run.device)  # summed loss, scored tokens
    for i in range(batches):
        if not resume.all_agree(not received, run.device):
            return {}
        batch, scale = mine[i * B:(i + 1) * B], 1.0
        if len(batch) == 0:  # this rank has run out of rows: it joins the forward and counts nothing
            batch, scale = rows[:1], 0.0
        batch = batch.to(run.device)
        with run.autocast:
            summed, n = loss_sums(run.raw_model, batch)  # eval.py's arithmetic, on this rank's share
        total += torch.stack([summed * scale, torch.tensor(n * scale, dtype=torch.float64, device=run.device)])
    if dist.is_initialized():
        dist.all_reduce(total)
    return {"val_loss": (total[0] / total[1]).item()}


# -----------------------------------------------------------------------------
# Samples, and a run's early ends: stop() saves and exits, lost() ends a survivor (their lines: logs.py)

def sample_text(run, step):
    """A continuation of sample_prompt, on every rank (FSDP gathers weights in every forward), from a generator of its
    own: training's random numbers are untouched, so a run with samples trains exactly as one without."""
    c = run.config
    generator = torch.Generator(device=run.device).manual_seed(c["seed"] + step)
    with run.autocast:
        return c["sample_prompt"] + sample(run.raw_model, run.tokenizer, c["sample_prompt"], c["sample_tokens"],
                                           c["sample_temperature"], 0, generator)


def stop(run, done, reason, path):
    """After the step reached is saved (at `path`): say why and how to continue. A signal (its number; 0: another
    rank's) exits with 128 + its number, as a process killed by it would; a tracker's failure (its line) is an error."""
    if isinstance(reason, str):
        raise UserError(logs.stopped(run, done, reason, path))
    if run.master:
        print(logs.stopped(run, done, reason, path), flush=True)
    raise SystemExit(128 + (reason or signal.SIGTERM))


def lost(run, step, error):
    """On each survivor of a process that died (none knows which of them would print): remove the checkpoint being
    written, say which process was lost and where to continue (now: torchrun's SIGTERM may end it), and exit."""
    for tmp in Path(run.config["out_dir"]).glob("ckpt_*.tmp"):
        shutil.rmtree(tmp, ignore_errors=True) if tmp.is_dir() else tmp.unlink(missing_ok=True)
    cli.print_error(logs.lost(run, step, error))
    raise SystemExit(1)


if __name__ == "__main__":
    cli.run(main)
