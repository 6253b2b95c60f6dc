"""Score a tst checkpoint: the held-out loss, and zero-shot multiple choice scored as lm-evaluation-harness scores it.

    python eval.py --ckpt RUN/ckpt.pt                      # held-out loss on the rows train.py's val_loss reads
    python eval.py --ckpt RUN/ckpt.pt --loss_tokens all    # the same over the whole validation split
    python eval.py --ckpt RUN/ckpt.pt --tasks hellaswag,arc_easy --limit 100 --data_dir ../shared/data/evals
    python eval.py --ckpt RUN/ckpt.pt --tasks all          # every task, from the Hugging Face hub

Results go to RUN/eval_step{step}.json, or RUN/eval_step{step}_limit{N}.json for tasks scored with --limit N: one row
per task and metric (value, stderr, n, step), merged with the rows of earlier runs at that step. The tasks' prompts
and readers are tools/tasks.py; sampling is sample.py, the Hugging Face export tools/export_hf.py.
"""

import argparse
import json
import math
import os
import sys
import time

import numpy as np
import torch
import torch.nn.functional as F
from tqdm import tqdm

import checkpoint
import cli
from cli import UserError, positive_int, torch_device
from data import load_meta, read_shard, validation_rows
from tools.tasks import TASKS, load_task

# -----------------------------------------------------------------------------
# Held-out loss

def token_bytes(tok):
    """UTF-8 bytes of each token id; 0 for special tokens (end-of-text, BOS: document marks, not text) and
    for ids the encoding leaves unused. A text's tokens' bytes sum to the text's UTF-8 length exactly."""
    special = {tok.enc.encode_single_token(s) for s in tok.enc.special_tokens_set}
    out = torch.zeros(tok.n_vocab, dtype=torch.long)
    for i in range(tok.n_vocab):
        if i not in special:
            try:
                out[i] = len(tok.enc.decode_single_token_bytes(i))
            except KeyError:
                pass
    return out


def heldout_batches(data_dir, tokenizer, seq_len, positions, batch_size):
    """Batches of held-out rows ((B, seq_len + 1) tokens) of a data folder prepared with `tokenizer`: train.py's,
    data.validation_rows for `positions` scored positions; positions="all": the whole val split, every token
    after the first of each shard scored once (those after a shard's last full row as one shorter row)."""
    if positions != "all" and positions < seq_len:
        raise UserError(f"{positions} held-out positions are less than one row of seq_len={seq_len}")
    meta = load_meta(data_dir)
    if meta["tokenizer"] != tokenizer:  # before reading any rows
        raise UserError(f"{data_dir} was tokenized with {meta['tokenizer']!r}, the checkpoint with {tokenizer!r}")
    rows = validation_rows(data_dir, seq_len, sys.maxsize if positions == "all" else positions // seq_len)
    batches = list(rows.split(batch_size))
    if positions == "all":  # the rows are every whole window of every shard; then each shard's rest
        for shard in (s["file"] for s in meta["shards"] if s["split"] == "val"):
            val = read_shard(os.path.join(data_dir, shard))
            rest = torch.from_numpy(val[(len(val) - 1) // seq_len * seq_len:].astype(np.int64))
            batches += [rest[None]] if len(rest) > 1 else []
    return batches


@torch.no_grad()
def loss_sums(model, rows):
    """Rows (B, L + 1) -> (their summed next-token loss over the last L tokens, a float64 tensor; the number of those
    tokens), through the model's chunked loss: what heldout_loss and train.py's val_loss add up."""
    loss, _ = model(rows[:, :-1], rows[:, 1:])
    return loss.double() * rows[:, 1:].numel(), rows[:, 1:].numel()


@torch.no_grad()
def heldout_loss(model, batches, bytes_per_token=None):
    """Next-token loss over batches of rows ((B, L + 1) tokens: the first L are read, the last L scored).

    Returns loss (mean nats per scored token: every target, end-of-text included), ppl = exp(loss) and tokens;
    given bytes_per_token (token_bytes above), also bytes (the UTF-8 bytes of the scored tokens, end-of-text
    counting 0) and bpb = summed loss in bits / bytes: what a coder driven by the model spends per byte of text.
    The model is put in eval mode for the measurement and given back in the mode it came in.
    """
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    total, tokens, n_bytes = 0.0, 0, 0
    for rows in batches:
        rows = rows.to(device)
        summed, n = loss_sums(model, rows)
        total, tokens = total + summed.item(), tokens + n
        if bytes_per_token is not None:
            n_bytes += bytes_per_token.to(device)[rows[:, 1:]].sum().item()
    model.train(was_training)
    out = {"loss": total / tokens, "ppl": math.exp(total / tokens), "tokens": tokens}
    if bytes_per_token is not None:
        out.update(bytes=n_bytes, bpb=total / math.log(2) / n_bytes)
    return out


# -----------------------------------------------------------------------------
# Scoring a task's documents (tools.tasks.load_task), request by request as the harness scores them

def doc_requests(doc):
    """(context, continuation) strings for each choice, with the one-space target delimiter."""
    if "target" in doc:  # multiple input (WinoGrande)
        return [(context, " " + doc["target"]) for context in doc["choices"]]
    return [(doc["context"], " " + choice) for choice in doc["choices"]]


def encode_pair(tok, context, continuation):
    """(context tokens, continuation tokens) as the harness's TemplateLM._encode_pair makes them: trailing
    whitespace of the context moves to the front of the continuation; the continuation's tokens are those of
    context + continuation after as many as the context has alone. BOS as the harness's Hugging Face backend
    adds it by default (the tokenizer's own rule, which an export writes): a tokenizer with a BOS token (Llama
    3's <|begin_of_text|>) starts every context with it, one without (GPT-2, our bytes) adds nothing."""
    n = len(context) - len(context.rstrip())
    if n:
        context, continuation = context[:-n], context[-n:] + continuation
    prefix = [tok.bos] if tok.bos is not None else []
    whole = prefix + tok.encode(context + continuation)
    ctx = prefix + tok.encode(context)
    return ctx, whole[len(ctx):]


def task_requests(tok, name, docs, max_len, truncate_long=False):
    """A task's requests as (context, continuation) token lists, and how many were truncated.

    A continuation longer than the model's window of max_len tokens cannot be scored whole (the harness
    asserts it is not): such a task is refused, or with truncate_long its continuation's last max_len tokens
    are scored, the tokens before them read as context.
    """
    pairs = [encode_pair(tok, c, x) for doc in docs for c, x in doc_requests(doc)]
    long = [len(cont) for _, cont in pairs if len(cont) > max_len]
    if long and not truncate_long:
        raise UserError(f"{name}: {len(long)} of {len(pairs)} requests have a continuation longer than the "
                        f"model's window of {max_len} tokens (the longest: {max(long)}): pass --truncate_long to "
                        f"score their last {max_len} tokens (counted as 'truncated' in the results)")
    # cont[:-max_len] is empty and cont[-max_len:] all of cont for a continuation that fits
    return [(ctx + cont[:-max_len], cont[-max_len:]) for ctx, cont in pairs], len(long)


@torch.no_grad()
def loglikelihoods(model, pairs, max_len, batch_size=16, device="cpu", desc="scoring"):
    """log p(continuation | context) summed over the continuation tokens, for (context, continuation) token
    lists. Requests that feed the model the same tokens share one row: the choices of a question whose
    continuations are one token each (MMLU's " A".." D", BoolQ's " no" / " yes" in BPE) read the same input,
    as in the harness's logits cache. Longest rows first, right-padded (causal: padding after changes nothing).
    """
    readers = {}  # input tokens -> the requests that read them
    for i, (ctx, cont) in enumerate(pairs):
        readers.setdefault(tuple((ctx + cont)[-(max_len + 1):][:-1]), []).append(i)  # the harness's left cut
    inputs = sorted(readers, key=len, reverse=True)
    out = [0.0] * len(pairs)
    # disable=None: no bar where stderr is no terminal (a log file would get every redraw, each after a "\r")
    for start in tqdm(range(0, len(inputs), batch_size), desc=desc, leave=False, disable=None):
        batch = inputs[start:start + batch_size]
        x = torch.zeros(len(batch), len(batch[0]), dtype=torch.long)
        for b, seq in enumerate(batch):
            x[b, :len(seq)] = torch.tensor(seq)
        logits = model(x.to(device))
        for b, seq in enumerate(batch):
            for i in readers[seq]:
                cont = torch.tensor(pairs[i][1], device=logits.device)
                logp = F.log_softmax(logits[b, len(seq) - len(cont):len(seq)].float(), dim=-1)
                out[i] = logp.gather(-1, cont[:, None]).sum().item()
    return out


def score(docs, lls):
    """Per document acc and acc_norm from each choice's log-likelihood (the harness's process_results): acc = 1
    if argmax_i ll_i is the gold choice (ties: the first); acc_norm divides ll_i by the length of choice i in
    characters first (without the delimiter). The harness reports acc only for WinoGrande, BoolQ and MMLU:
    MMLU's choices are the letters A-D, so acc_norm = acc there, and WinoGrande's acc_norm divides by its
    contexts' lengths."""
    acc, acc_norm = [], []
    for doc, ll in zip(docs, lls, strict=True):
        ll, chars = np.array(ll), np.array([float(len(c)) for c in doc["choices"]])
        acc.append(float(np.argmax(ll) == doc["gold"]))
        acc_norm.append(float(np.argmax(ll / chars) == doc["gold"]))
    return acc, acc_norm


def mean_stderr(xs):
    # the harness's standard error of a mean: sample standard deviation / sqrt(n)
    return float(np.std(xs, ddof=1) / math.sqrt(len(xs))) if len(xs) > 1 else None


def pooled_stderr(xs, groups):
    """MMLU: the subjects' standard errors pooled as the harness's metrics.pooled_sample_stderr pools them
    (the harness pools twice, subjects into its four categories and those into MMLU: at full size the two
    differ by about 1e-5)."""
    by = {}
    for x, g in zip(xs, groups):
        by.setdefault(g, []).append(x)
    sizes, errs = [len(v) for v in by.values()], [mean_stderr(v) or 0.0 for v in by.values()]
    if sum(sizes) <= len(sizes):
        return None
    var = sum((n - 1) * e * e * n for n, e in zip(sizes, errs)) / (sum(sizes) - len(sizes))
    return math.sqrt(var / sum(sizes))


def evaluate_task(model, name, docs, pairs, truncated, max_len, batch_size=16, device="cpu"):
    """Score a task's documents from their requests (task_requests) -> result rows {task, metric, value, stderr,
    n, truncated}: the mean over documents, with the harness's standard error (pooled over subjects for MMLU,
    which the harness weights by size)."""
    flat = loglikelihoods(model, pairs, max_len, batch_size, device, desc=name)
    lls, i = [], 0
    for doc in docs:
        lls.append(flat[i:i + len(doc["choices"])])
        i += len(doc["choices"])
    rows = []
    for metric, xs in zip(("acc", "acc_norm"), score(docs, lls)):
        err = pooled_stderr(xs, [d["subject"] for d in docs]) if name == "mmlu" else mean_stderr(xs)
        rows.append({"task": name, "metric": metric, "value": float(np.mean(xs)), "stderr": err, "n": len(docs),
                     "truncated": truncated})
    return rows


# -----------------------------------------------------------------------------
# Results

def write_results(path, rows, step, meta):
    """Merge result rows into the JSON at path (one file per checkpoint step: a later run of other tasks
    adds to it, a rerun of a task replaces that task's rows)."""
    old = {"results": []}
    if os.path.exists(path):
        with open(path) as f:
            old = json.load(f)
    new = {(r["task"], r["metric"]) for r in rows}
    kept = [r for r in old["results"] if (r["task"], r["metric"]) not in new]
    tmp = f"{path}.tmp"  # written whole, then renamed: a full disk or a kill never leaves earlier results cut
    try:
        with open(tmp, "w") as f:
            json.dump({**meta, "step": step, "results": kept + [{**r, "step": step} for r in rows]}, f, indent=1)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def print_table(rows):
    width = max(len("task"), *(len(r["task"]) for r in rows)) + 2
    print(f"{'task':<{width}}{'metric':<10}{'value':>10}{'stderr':>10}{'n':>10}")
    for r in rows:
        err = "" if r["stderr"] is None else f"{r['stderr']:.4f}"
        print(f"{r['task']:<{width}}{r['metric']:<10}{r['value']:>10.4f}{err:>10}{r['n']:>10}")


# -----------------------------------------------------------------------------
# Command line

def loss_tokens(text):
    """--loss_tokens: a whole number of positions (1e6 works) or all."""
    if text == "all":
        return text
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text} is neither a number of positions nor all") from None
    if not (math.isfinite(value) and value.is_integer()):
        raise argparse.ArgumentTypeError(f"{text} is not a whole number of positions (or all)")
    return positive_int(str(int(value)))


def task_names(text):
    """--tasks: comma-separated names, or all. Every name is checked before anything is loaded."""
    names = TASKS if text == "all" else [t.strip() for t in text.split(",")]
    wrong = [t for t in names if t not in TASKS]
    if wrong:
        what = "an empty task name" if "" in wrong else f"unknown task {wrong[0]!r}"
        raise UserError(f"--tasks {text!r}: {what}; give comma-separated names from {', '.join(TASKS)}, or all")
    return list(dict.fromkeys(names))  # once each, in the order given


def task_rows(model, tok, names, args, device):
    """Result rows of the named tasks, and where their documents came from."""
    window = model.cfg.max_seq_len
    tasks = {name: load_task(name, args.data_dir, args.limit) for name in names}
    # every task's requests before any is scored, so that a long continuation is refused at once
    requests = {name: task_requests(tok, name, docs, window, args.truncate_long) for name, docs in tasks.items()}
    rows = []
    for name, docs in tasks.items():
        rows += evaluate_task(model, name, docs, *requests[name], window, args.batch_size or 16, device)
        if requests[name][1]:
            print(f"{name}: {requests[name][1]} continuations longer than the window of {window} tokens were "
                  f"scored on their last {window} tokens")
    bos = "a BOS token starts every context" if tok.bos is not None else "no BOS (the tokenizer has none)"
    print(f"{tok.name} tokenizer: {bos}")
    return rows, os.path.abspath(args.data_dir) if args.data_dir else "hub"


def run_data_dir(config, ckpt):
    """The run's data folder, as its config records it. Checked here: data.load_meta would advise preparing a folder
    that is only missing because a relative data_dir is looked for from another directory."""
    data_dir = config["data_dir"]
    if not os.path.isdir(data_dir):
        fix = (f" from {os.getcwd()}: run eval.py from the folder training ran in, or pass --loss_data DIR"
               if not os.path.isabs(data_dir) else ": pass --loss_data DIR, a folder data.py prepared")
        raise UserError(f"the run's data_dir {data_dir} (as the config in {ckpt} records it) is not found{fix}")
    return data_dir


def loss_rows(model, tok, config, args):
    """Result rows of the held-out loss (loss, ppl, bpb), and the data folder it was measured on."""
    data_dir = args.loss_data or run_data_dir(config, args.ckpt)
    # by default the rows train.py's val_loss reads (eval_tokens), so that the two agree
    positions = args.loss_tokens or config["eval_tokens"]
    batches = heldout_batches(data_dir, config["tokenizer"], config["seq_len"], positions,
                              args.batch_size or config["batch_size"])
    r = heldout_loss(model, batches, token_bytes(tok))
    task = "heldout_val_all" if positions == "all" else "heldout_val"
    rows = [{"task": task, "metric": m, "value": r[m], "stderr": None, "n": r["tokens"]}
            for m in ("loss", "ppl", "bpb")]
    return rows, os.path.abspath(data_dir)


def main(argv):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--ckpt", required=True, help="a checkpoint written by train.py (file or FSDP folder)")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--batch_size", type=positive_int, default=None,
                   help="rows per forward pass (tasks: 16; loss: the run's)")
    p.add_argument("--tasks", default=None, help=f"comma-separated, or all: {','.join(TASKS)} (default: the "
                                                 f"held-out loss)")
    p.add_argument("--limit", type=positive_int, default=None, help="first N documents per task (per subject for mmlu)")
    p.add_argument("--data_dir", default=None, help="offline copies (layout of ../shared/data/evals); default: the hub")
    p.add_argument("--truncate_long", action="store_true",
                   help="score a continuation longer than the model's window on its last tokens (else refused)")
    p.add_argument("--loss_data", default=None, help="held-out loss: a folder prepared by data.py (default: the run's)")
    p.add_argument("--loss_tokens", type=loss_tokens, default=None,
                   help="held-out positions to score, or 'all': the whole val split (default: the run's eval_tokens, "
                        "the rows train.py's val_loss reads)")
    args = p.parse_args(argv)

    device = torch_device(args.device)
    names = task_names(args.tasks) if args.tasks is not None else None
    model, state = checkpoint.load_model(args.ckpt, device)
    config = state["config"]
    tok = checkpoint.run_tokenizer(config)
    t0 = time.time()
    rows, source = task_rows(model, tok, names, args, device) if names else loss_rows(model, tok, config, args)
    print_table(rows)
    suffix = f"_limit{args.limit}" if args.limit and names else ""
    path = os.path.join(os.path.dirname(os.path.abspath(args.ckpt)), f"eval_step{state['step']}{suffix}.json")
    write_results(path, [{**r, "data": source} for r in rows], state["step"],
                  {"checkpoint": os.path.abspath(args.ckpt), "tokenizer": config["tokenizer"],
                   "bos_prepended": tok.bos is not None})
    print(f"step {state['step']}, {time.time() - t0:.1f}s; results in {path}")


if __name__ == "__main__":
    cli.run(main)
