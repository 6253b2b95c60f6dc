"""
Every setting of a run in one table, with its default and meaning; `load` applies config files and --key=value
overrides to it, and `check` refuses impossible values before any work, naming the setting and what is allowed.

    python train.py config/tiny_tst.py --lr=1e-3    # a config file is plain Python that assigns some settings
    python train.py --help                          # the table below

An override must name an existing setting and keep its default's type (an int where a float is expected is fine).
The resolved config is saved as out_dir/config.json and in every checkpoint.
"""

import ast
import math
from dataclasses import fields
from pathlib import Path

import tst  # TST
from cli import UserError
from model import ModelConfig

SECTIONS = {}  # title -> {setting: (default, meaning)}, in --help's order


def section(title, **settings):
    SECTIONS[title] = settings


section(
    "run",
    out_dir=("out/run", "checkpoints, config.json, log.jsonl"),
    seed=(1337, "model initialisation, data order, everything random"),
)
section(
    "data: a folder of shards written by prepare.py, which records its tokenizer",
    data_dir=("data/books_bytes", "the prepared data folder"),
    data_source=("books", "what prepare.py makes data_dir from; books and stdlib are prepared by train.py itself"),
    tokenizer=("bytes", "must be the one data_dir was prepared with"),
)
section(
    "batch",
    seq_len=(128, "T: positions the transformer sees per row, in every stage"),
    batch_size=(16, "rows per micro-batch per process"),
    global_batch_tokens=(0, "positions per optimizer step, whatever the process count (gradient accumulation "
                            "fills it); 0 = one micro-batch per process"),
    max_steps=(600, "optimizer steps of the whole run, every stage"),
)
section(
    "AdamW and one Warmup-Stable-Decay schedule over all max_steps",
    lr=(3e-3, "peak learning rate"),
    warmup_steps=(30, "linear warm-up from 0"),
    decay_frac=(0.1, "fraction of max_steps at the end that decays linearly to 0"),
    weight_decay=(0.1, "on matrices and embeddings only"),
    beta1=(0.9, "AdamW"),
    beta2=(0.95, "AdamW"),
    grad_clip=(1.0, "clip the gradient norm at this; 0 = no clipping"),
)
section(
    "evaluation, logs, checkpoints",
    eval_interval=(100, "held-out next-token loss every eval_interval steps, at every stage boundary and at the end"),
    eval_tokens=(65536, "positions scored per evaluation: fixed rows spread over the whole val split"),
    log_interval=(10, "steps between console lines; log.jsonl gets every step"),
    ckpt_interval=(200, "steps between checkpoints"),
    keep_last=(2, "checkpoints kept, besides the one at each stage boundary"),
    resume=(False, "continue the run in out_dir from its newest checkpoint"),
    init_from=("", "start a new run from this checkpoint (a ckpt file or folder, or a run's out_dir)"),
    init_weights_only=(False, "with init_from: its weights only, at step 0 (a warm start)"),
    sample_interval=(0, "print and log a sample every this many steps; 0 = never"),
    sample_prompt=("", "what samples continue"),
    sample_tokens=(64, "tokens per sample"),
    sample_temperature=(0.0, "0 = greedy; sampling is seeded and leaves training's random numbers alone"),
    wandb_project=("", "also log to Weights & Biases (pip install wandb; WANDB_MODE=offline works)"),
    wandb_run_name=("", "default: wandb's"),
    tensorboard=(False, "also log to out_dir/tensorboard (pip install tensorboard)"),
)
section(
    "system",
    device=("auto", "auto | cpu | cuda"),
    dtype=("auto", "auto (bfloat16 on CUDA, float32 on CPU) | float32 | bfloat16"),
    compile=(False, "torch.compile each transformer block"),
    fsdp=(False, "FSDP2 (per-block sharding, bf16 parameters, fp32 gradient reduction) instead of DDP"),
    peak_flops=(0.0, "per-device peak FLOP/s for MFU; 0 = 989e12 (H100/H200 dense bf16) on CUDA, none on CPU"),
)
section("Token Superposition Training (tst.py)", **tst.SETTINGS)  # TST
_model = ModelConfig()
section(
    "model: ModelConfig's fields (model.py; the mixture of experts: moe.py)",
    vocab_size=(0, "rows of the embedding and the LM head; 0 = the data folder's"),
    dim=(_model.dim, "width of the residual stream"),
    n_layers=(_model.n_layers, "transformer blocks"),
    n_heads=(_model.n_heads, "query heads (head_dim = dim / n_heads)"),
    n_kv_heads=(_model.n_kv_heads, "= n_heads: full multi-head attention; fewer: grouped-query attention"),
    ffn_dim=(_model.ffn_dim, "hidden width of the SwiGLU feed-forward"),
    rope_theta=(_model.rope_theta, "RoPE base (Llama 3's)"),
    norm_eps=(_model.norm_eps, "RMSNorm epsilon"),
    max_seq_len=(_model.max_seq_len, "the longest row the model accepts"),
    tie_embeddings=(_model.tie_embeddings, "share the input embedding with the LM head"),
    qk_norm=(_model.qk_norm, "RMSNorm on each query and key head before RoPE (Qwen3)"),
    init_std=(_model.init_std, "N(0, init_std) for matrices; residual projections get init_std / sqrt(2 n_layers)"),
    n_experts=(_model.n_experts, "experts per MoE layer; 0 = dense, and the settings below are unused"),
    top_k=(_model.top_k, "experts per position"),
    expert_ffn_dim=(_model.expert_ffn_dim, "hidden width of each expert's SwiGLU"),
    shared_expert_ffn_dim=(_model.shared_expert_ffn_dim, "0: no shared expert; else a dense SwiGLU for every position"),
    balance=(_model.balance, "aux: Qwen3's load-balancing loss; bias: aux-loss-free expert bias; none"),
    aux_loss_coef=(_model.aux_loss_coef, "weight of each layer's load-balancing loss (balance=aux)"),
    bias_update_rate=(_model.bias_update_rate, "step of the expert bias per optimizer step (balance=bias)"),
    experts_impl=(_model.experts_impl, "loop (the reference) | grouped (torch's grouped GEMM) | auto: grouped on CUDA"),
)

DEFAULTS = {name: default for settings in SECTIONS.values() for name, (default, _) in settings.items()}
MODEL_KEYS = [f.name for f in fields(ModelConfig)]
assert set(MODEL_KEYS) <= set(DEFAULTS), "every field of ModelConfig is a setting: add the new one above"
# Settings a resumed run may change; every other one must match the checkpoint's.
RESUMABLE_KEYS = {"out_dir", "resume", "eval_interval", "eval_tokens", "log_interval", "ckpt_interval", "keep_last",
                  "compile", "device", "peak_flops", "data_dir", "sample_interval", "sample_prompt", "sample_tokens",
                  "sample_temperature", "wandb_project", "wandb_run_name", "tensorboard"}
# Settings that give a checkpoint its meaning: a run started from it (init_from) must keep them.
IDENTITY_KEYS = MODEL_KEYS + ["tokenizer"]


def help_text():
    lines = []
    for title, settings in SECTIONS.items():
        lines.append(f"\n# {title}")
        lines += [f"  {name:<21} {default!r:<22} {meaning}" for name, (default, meaning) in settings.items()]
    return "\n".join(lines)


def load(argv):
    """Defaults <- config files <- --key=value, each key known and each value of its default's type; checked."""
    config = dict(DEFAULTS)
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
            assign(config, key, value, arg)
            continue
        path = Path(arg)
        if not path.is_file():
            raise UserError(f"config file {arg} not found")
        namespace = {"__file__": str(path)}
        try:
            exec(compile(path.read_text(), str(path), "exec"), namespace)
        except SyntaxError as e:
            raise UserError(f"config file {arg}, line {e.lineno}: {e.msg}") from None
        for key, value in namespace.items():
            if not key.startswith("_") and not callable(value) and type(value).__name__ != "module":
                assign(config, key, value, str(path))
    check(config)
    return config


def assign(config, key, value, where):
    if key not in DEFAULTS:
        raise UserError(f"{where}: unknown setting {key!r}; python train.py --help lists them")
    default = DEFAULTS[key]
    if isinstance(default, float) and isinstance(value, int) and not isinstance(value, bool):
        value = float(value)
    allowed = (str, list) if key == "bag_weights" else (type(default),)
    if not isinstance(value, allowed) or isinstance(value, bool) != isinstance(default, bool):
        raise UserError(f"{where}: {key}={value!r} is {_a(type(value).__name__)}, "
                        f"but {key} takes {' or '.join(_a(t.__name__) for t in allowed)}")
    if key == "s_schedule":  # tuples or lists, from a file or the command line: the same schedule
        value = [tuple(pair) if isinstance(pair, (list, tuple)) else pair for pair in value]
    config[key] = value


def _a(noun):
    return ("an " if noun[0] in "aeiou" else "a ") + noun


def check(config, world_size=1):
    """Every setting, checked here before any work: a UserError naming the setting, its value and what is allowed."""
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
    try:  # the model's and the method's own rules, which name the setting
        model = {k: c[k] for k in MODEL_KEYS}
        ModelConfig(**{**model, "vocab_size": model["vocab_size"] or 1})  # 0: the data's, known later
        tst.check(c)  # TST
    except ValueError as e:
        raise UserError(str(e)) from None


def notes(config):
    """Lines for train.py to print at its start: checked settings that quietly make a run other than its config
    suggests (a TST config that trains a plain baseline)."""
    c, found = config, []
    one_stage = not c["s_schedule"]  # TST: a schedule's stages each have a step (tst.check)
    if one_stage and c["s"] > 1 and c["r"] == 0:  # TST
        found.append(f"s={c['s']} with r={c['r']}: no step reads bags; this run is a plain baseline")  # TST
    if one_stage and c["s"] == 1 and c["r"] > 0:  # TST
        found.append(f"s=1 with r={c['r']}: a bag of one token is that token; this run is a plain baseline")  # TST
    if one_stage and c["s"] > 1 and c["r"] > 0 and tst.step_at(c["r"], c["max_steps"]) == 0:  # TST
        found.append(f"s={c['s']} with r={c['r']} of max_steps={c['max_steps']}: floor(r * max_steps) = 0, "  # TST
                     f"so no step reads bags; this run is a plain baseline")  # TST
    return found


def lr_at(step, config):
    """Warmup-Stable-Decay: linear warm-up, constant, then linear decay to 0 over the last decay_frac of all steps."""
    decay_steps = round(config["decay_frac"] * config["max_steps"])
    decay_start = config["max_steps"] - decay_steps
    if step < config["warmup_steps"]:
        return config["lr"] * (step + 1) / config["warmup_steps"]
    if step < decay_start:
        return config["lr"]
    return config["lr"] * (1 - (step - decay_start) / decay_steps)
