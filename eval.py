"""Evaluate a tst checkpoint: held-out loss, zero-shot multiple choice scored as lm-evaluation-harness scores it,
export to a Hugging Face model folder (weights and tokenizer), and a sampler.

    python eval.py --ckpt RUN/ckpt.pt                      # held-out loss (--loss_tokens all: the whole val split)
    python eval.py --ckpt RUN/ckpt.pt --tasks hellaswag,arc_easy --limit 100 --data_dir ../shared/data/evals
    python eval.py export --ckpt RUN/ckpt.pt --out hf/RUN   # for transformers and lm_eval --model hf
    python eval.py sample --ckpt RUN/ckpt.pt --prompt "It was a dark and stormy night"

Results go to RUN/eval_step{step}.json (one row per task and metric: value, stderr, n, step).
"""
import argparse
import bz2
import csv
import glob
import importlib.util
import json
import math
import os
import re
import sys
import time
import zipfile
from dataclasses import fields

import numpy as np
import torch
import torch.nn.functional as F
from tqdm import tqdm

from data import UserError, get_tokenizer, load_meta, read_shard, validation_rows
from model import ModelConfig, Transformer

# -----------------------------------------------------------------------------
# Checkpoints

CKPT_KEYS = ("model", "model_config", "config", "step")


def load_checkpoint(path, device="cpu"):
    """A train.py checkpoint -> (model in eval mode, the checkpoint dict).

    A file holds everything; an FSDP run's checkpoint is a folder of torch.distributed.checkpoint shards
    (model and optimizer) with the rest in train_state.pt, read here in one process.
    """
    sharded = os.path.isdir(path)
    state = os.path.join(path, "train_state.pt") if sharded else path
    if not os.path.isfile(state):
        raise UserError(f"no checkpoint at {state}: --ckpt takes a file or FSDP folder written by train.py")
    if not zipfile.is_zipfile(state):  # what torch.save writes; a truncated file has lost its directory
        raise UserError(f"{state} is not a checkpoint saved by train.py, or it is truncated")
    ckpt = torch.load(state, map_location="cpu", weights_only=False)  # ours: it holds the config and RNG states
    keys = CKPT_KEYS[1:] if sharded else CKPT_KEYS
    if not isinstance(ckpt, dict) or any(k not in ckpt for k in keys):
        found = sorted(ckpt) if isinstance(ckpt, dict) else type(ckpt).__name__
        raise UserError(f"{state} is not a checkpoint saved by train.py: expected a dict with keys "
                        f"{list(keys)}, found {found}")
    unknown = sorted(set(ckpt["model_config"]) - {f.name for f in fields(ModelConfig)})
    if unknown:
        raise UserError(f"{state} was saved by another version of model.py: its model_config has {unknown}, "
                        f"which this ModelConfig lacks")
    model = Transformer(ModelConfig(**ckpt["model_config"]))
    if sharded:
        import torch.distributed.checkpoint as dcp
        ckpt["model"] = model.state_dict()
        dcp.load({"model": ckpt["model"]}, checkpoint_id=path)  # fills the tensors in place
    model.load_state_dict(ckpt["model"])
    return model.to(device).eval(), ckpt


def checkpoint_tokenizer(config):
    """The tokenizer the run trained with, as its config names it."""
    name = config["tokenizer"]
    if name.startswith("llama3:") and not os.path.isfile(name.removeprefix("llama3:")):
        raise UserError(f"the checkpoint's tokenizer {name!r}: no such file seen from {os.getcwd()}; run eval.py "
                        f"from the folder training ran in")
    return get_tokenizer(name)


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
    after the first scored once (those after the last full row as one shorter row)."""
    if positions != "all" and positions < seq_len:
        raise UserError(f"{positions} held-out positions are less than one row of seq_len={seq_len}")
    meta = load_meta(data_dir)
    if meta["tokenizer"] != tokenizer:  # before reading any rows
        raise UserError(f"{data_dir} was tokenized with {meta['tokenizer']!r}, the checkpoint with {tokenizer!r}")
    rows = validation_rows(data_dir, seq_len, sys.maxsize if positions == "all" else positions // seq_len)
    batches = list(rows.split(batch_size))
    if positions == "all":
        shards = [s["file"] for s in meta["shards"] if s["split"] == "val"]
        val = np.concatenate([read_shard(os.path.join(data_dir, f)) for f in shards])
        rest = torch.from_numpy(val[rows.shape[0] * seq_len:].astype(np.int64))
        batches += [rest[None]] if len(rest) > 1 else []
    return batches


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
        x, y = rows[:, :-1], rows[:, 1:]
        logits = model(x).float()
        total += F.cross_entropy(logits.reshape(-1, logits.size(-1)), y.reshape(-1), reduction="sum").item()
        tokens += y.numel()
        if bytes_per_token is not None:
            n_bytes += bytes_per_token.to(device)[y].sum().item()
    model.train(was_training)
    out = {"loss": total / tokens, "ppl": math.exp(total / tokens), "tokens": tokens}
    if bytes_per_token is not None:
        out.update(bytes=n_bytes, bpb=total / math.log(2) / n_bytes)
    return out


# -----------------------------------------------------------------------------
# Tasks, 0-shot, as lm-evaluation-harness v0.4 (the paper's) prompts them: a document becomes {"context",
# "choices", "gold"}, with each builder following the harness task file it names; choice i is then scored as
# the log-likelihood of " " + choice_i after the context. WinoGrande is the harness's "multiple input" case:
# {"choices" (contexts: the sentence up to the blank, option filled in), "target" (the rest, shared), "gold"}.
# Builders take the original dataset rows (Hugging Face hub field names); the local readers further down turn
# the offline copies into the same documents.

def hellaswag_clean(text):
    """The harness's hellaswag/utils.py preprocess: WikiHow's bracketed markers out, " [title]" -> ". "."""
    text = text.strip().replace(" [title]", ". ")
    text = re.sub(r"\[.*?\]", "", text)
    return text.replace("  ", " ")


def hellaswag_doc(row):
    # hellaswag/utils.py process_docs: the query is activity_label + ": " + ctx_a + " " + ctx_b.capitalize()
    ctx = row["ctx_a"] + " " + row["ctx_b"].capitalize()
    return {"context": hellaswag_clean(row["activity_label"] + ": " + ctx),
            "choices": [hellaswag_clean(e) for e in row["endings"]], "gold": int(row["label"])}


def arc_doc(row):
    # arc/arc_easy.yaml (arc_challenge.yaml includes it)
    return {"context": f"Question: {row['question']}\nAnswer:", "choices": list(row["choices"]["text"]),
            "gold": row["choices"]["label"].index(row["answerKey"])}


def piqa_doc(row):
    # piqa/piqa.yaml
    return {"context": f"Question: {row['goal']}\nAnswer:", "choices": [row["sol1"], row["sol2"]],
            "gold": int(row["label"])}


def winogrande_doc(row):
    # winogrande/preprocess_winogrande.py: the option goes into the context, the rest of the sentence
    # after the blank is the shared continuation
    blank = row["sentence"].index("_")
    return {"choices": [row["sentence"][:blank] + row[o] for o in ("option1", "option2")],
            "target": row["sentence"][blank + 1:].strip(), "gold": int(row["answer"]) - 1}


def boolq_doc(row):
    # super_glue/boolq/default.yaml
    return {"context": f"{row['passage']}\nQuestion: {row['question']}?\nAnswer:", "choices": ["no", "yes"],
            "gold": int(row["label"])}


def openbookqa_doc(row):
    # openbookqa/openbookqa.yaml: the bare question stem
    return {"context": row["question_stem"], "choices": list(row["choices"]["text"]),
            "gold": row["choices"]["label"].index(row["answerKey"].lstrip())}


def mmlu_doc(row):
    # mmlu/default/_default_template_yaml plus each subject's description, 0-shot
    subject = row["subject"].replace("_", " ")
    c = row["choices"]
    return {"context": f"The following are multiple choice questions (with answers) about {subject}.\n\n"
                       f"{row['question'].strip()}\nA. {c[0]}\nB. {c[1]}\nC. {c[2]}\nD. {c[3]}\nAnswer:",
            "choices": ["A", "B", "C", "D"], "gold": int(row["answer"]), "subject": row["subject"]}


# where the harness loads each task from: (hub dataset, config, split, row -> document)
HUB = {
    "hellaswag": ("Rowan/hellaswag", None, "validation", hellaswag_doc),
    "arc_easy": ("allenai/ai2_arc", "ARC-Easy", "test", arc_doc),
    "arc_challenge": ("allenai/ai2_arc", "ARC-Challenge", "test", arc_doc),
    "piqa": ("baber/piqa", None, "validation", piqa_doc),
    "winogrande": ("allenai/winogrande", "winogrande_xl", "validation", winogrande_doc),
    "boolq": ("aps/super_glue", "boolq", "validation", boolq_doc),
    "openbookqa": ("allenai/openbookqa", "main", "test", openbookqa_doc),
    "mmlu": ("cais/mmlu", "all", "test", mmlu_doc),
}
TASKS = tuple(HUB)


def read_jsonl(path):
    with open(path, encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


def local_hellaswag(path):
    # klosax/hellaswag_text_data: 6 lines per item, activity_label + ": " + ctx, the gold index, 4 endings,
    # WikiHow markers already removed. ctx is ctx_a + " " + ctx_b with ctx_b not capitalised, and where
    # ctx_b starts is not recorded: it is the unfinished sentence at the end (ActivityNet items; WikiHow
    # contexts end with a full stop and have no ctx_b), so we capitalise that, as the harness does.
    lines = bz2.open(path, "rt", encoding="utf-8").read().splitlines()
    docs = []
    for i in range(0, len(lines), 6):
        query = lines[i]
        end = [m.end() for m in re.finditer(r"[.!?] ", query)]
        if end and query[-1] not in ".!?\"'" and query[end[-1]:end[-1] + 1].islower():
            query = query[:end[-1]] + query[end[-1]:].capitalize()
        docs.append({"context": hellaswag_clean(query), "choices": [hellaswag_clean(e) for e in lines[i + 2:i + 6]],
                     "gold": int(lines[i + 1])})
    return docs


def local_query_doc(suffix, strip=""):
    # MosaicML llm-foundry {"query", "choices", "gold"}: the query is the harness's context up to "\nAnswer:"
    def read(path):
        return [{"context": r["query"].removeprefix(strip) + suffix, "choices": r["choices"], "gold": r["gold"]}
                for r in read_jsonl(path)]
    return read


def local_piqa(path):
    labels = os.path.join(os.path.dirname(path), "valid-labels.lst")
    if not os.path.isfile(labels):
        raise UserError(f"piqa: no {labels} (the labels of {path})")
    with open(labels) as f:
        labels = f.read().split()
    return [piqa_doc({**r, "label": label}) for r, label in zip(read_jsonl(path), labels, strict=True)]


def local_winogrande(path):
    # MosaicML {"context_options": sentence up to the blank + each option, "continuation": the rest, stripped}
    return [{"choices": r["context_options"], "target": r["continuation"], "gold": r["gold"]}
            for r in read_jsonl(path)]


def local_mmlu(path):
    # the hendrycks release: one headerless CSV per subject, columns question, A, B, C, D, answer letter
    docs = []
    for f in sorted(glob.glob(os.path.join(path, "*_test.csv"))):
        subject = os.path.basename(f).removesuffix("_test.csv")
        with open(f, encoding="utf-8", newline="") as fh:
            for q, a, b, c, d, answer in csv.reader(fh):
                docs.append(mmlu_doc({"subject": subject, "question": q, "choices": [a, b, c, d],
                                      "answer": "ABCD".index(answer)}))
    if not docs:
        raise UserError(f"mmlu: no test files (*_test.csv) in {path}")
    return docs


# the offline copies (../shared/data/evals, see its README): path under --data_dir, reader
LOCAL = {
    "hellaswag": ("hellaswag/hellaswag_val_full.txt.bz2", local_hellaswag),
    "arc_easy": ("arc_easy/arc_easy.jsonl", local_query_doc("\nAnswer:")),
    "arc_challenge": ("arc_challenge/arc_challenge.jsonl", local_query_doc("\nAnswer:")),
    "piqa": ("piqa/valid.jsonl", local_piqa),
    "winogrande": ("winogrande/winogrande.jsonl", local_winogrande),
    "boolq": ("boolq/boolq.jsonl", local_query_doc("\nAnswer:", strip="Passage: ")),
    "openbookqa": ("openbookqa/openbook_qa.jsonl", local_query_doc("")),
    "mmlu": ("mmlu/test", local_mmlu),
}


def load_task(name, data_dir=None, limit=None):
    """Documents of a task: from the hub through `datasets`, or from the offline copies in data_dir.

    limit keeps the first `limit` documents, of each subject for MMLU (whose subjects are separate tasks
    in the harness, which applies --limit to each).
    """
    if name not in HUB:
        raise UserError(f"unknown task {name!r}; tasks: {', '.join(TASKS)}")
    if data_dir is None:
        import datasets
        path, config, split, build = HUB[name]
        docs = [build(row) for row in datasets.load_dataset(path, config, split=split)]
    else:
        if not os.path.isdir(data_dir):
            raise UserError(f"no eval data folder {data_dir} (--data_dir takes the layout of ../shared/data/evals)")
        rel, read = LOCAL[name]
        path = os.path.join(data_dir, rel)
        if not os.path.exists(path):
            raise UserError(f"{name}: no {path} (--data_dir must hold the layout of ../shared/data/evals)")
        docs = read(path)
    if limit is None:
        return docs
    kept, seen = [], {}
    for doc in docs:
        key = doc.get("subject")
        seen[key] = seen.get(key, 0) + 1
        if seen[key] <= limit:
            kept.append(doc)
    return kept


# -----------------------------------------------------------------------------
# Scoring

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
    for start in tqdm(range(0, len(inputs), batch_size), desc=desc, leave=False):
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
    with open(path, "w") as f:
        json.dump({**meta, "step": step, "results": kept + [{**r, "step": step} for r in rows]}, f, indent=1)


def print_table(rows):
    width = max(len("task"), *(len(r["task"]) for r in rows)) + 2
    print(f"{'task':<{width}}{'metric':<10}{'value':>10}{'stderr':>10}{'n':>10}")
    for r in rows:
        err = "" if r["stderr"] is None else f"{r['stderr']:.4f}"
        print(f"{r['task']:<{width}}{r['metric']:<10}{r['value']:>10.4f}{err:>10}{r['n']:>10}")


# -----------------------------------------------------------------------------
# Export to Hugging Face transformers
# Our layout is Llama's with other names (rotate-half RoPE, RMSNorm in float32 then the weight, SwiGLU,
# no biases), so an export is a renaming plus a config. Which class: dense -> LlamaForCausalLM; with QK-norm
# -> Qwen3ForCausalLM; MoE -> Qwen3MoeForCausalLM (softmax router, top-k renormalised, QK-norm). Experts are
# written one by one, the layout of Qwen's own MoE checkpoints, which transformers >= 5 fuses on load.

def hf_config(cfg, tok):
    common = {
        "vocab_size": cfg.vocab_size, "hidden_size": cfg.dim, "num_hidden_layers": cfg.n_layers,
        "num_attention_heads": cfg.n_heads, "num_key_value_heads": cfg.n_kv_heads, "head_dim": cfg.head_dim,
        "intermediate_size": cfg.ffn_dim, "hidden_act": "silu", "max_position_embeddings": cfg.max_seq_len,
        "rms_norm_eps": cfg.norm_eps, "rope_theta": cfg.rope_theta, "tie_word_embeddings": cfg.tie_embeddings,
        "attention_bias": False, "attention_dropout": 0.0, "torch_dtype": "float32",
        "bos_token_id": tok.bos, "eos_token_id": tok.eot, "pad_token_id": None,
    }
    if cfg.n_experts:
        if not cfg.qk_norm:
            raise UserError("Qwen3MoeForCausalLM always applies QK-norm; this MoE model has qk_norm=False")
        if cfg.shared_expert_ffn_dim:
            raise UserError("Qwen3MoeForCausalLM has no shared expert; this model has one")
        return {**common, "architectures": ["Qwen3MoeForCausalLM"], "model_type": "qwen3_moe",
                "num_experts": cfg.n_experts, "num_experts_per_tok": cfg.top_k,
                "moe_intermediate_size": cfg.expert_ffn_dim, "norm_topk_prob": True, "decoder_sparse_step": 1,
                "mlp_only_layers": [], "use_sliding_window": False}
    if cfg.qk_norm:
        return {**common, "architectures": ["Qwen3ForCausalLM"], "model_type": "qwen3", "use_sliding_window": False}
    return {**common, "architectures": ["LlamaForCausalLM"], "model_type": "llama", "mlp_bias": False}


def hf_state_dict(sd, cfg):
    out = {"model.embed_tokens.weight": sd["embed.weight"], "model.norm.weight": sd["norm.weight"]}
    if not cfg.tie_embeddings:
        out["lm_head.weight"] = sd["lm_head.weight"]
    for i in range(cfg.n_layers):
        ours, hf = f"layers.{i}.", f"model.layers.{i}."
        out[hf + "input_layernorm.weight"] = sd[ours + "attn_norm.weight"]
        out[hf + "post_attention_layernorm.weight"] = sd[ours + "mlp_norm.weight"]
        names = [("wq", "q_proj"), ("wk", "k_proj"), ("wv", "v_proj"), ("wo", "o_proj")]
        names += [("q_norm", "q_norm"), ("k_norm", "k_norm")] if cfg.qk_norm else []
        for a, b in names:
            out[f"{hf}self_attn.{b}.weight"] = sd[f"{ours}attn.{a}.weight"]
        mlp = [("w_gate", "gate_proj"), ("w_up", "up_proj"), ("w_down", "down_proj")]
        if cfg.n_experts:
            bias = [v for k, v in sd.items() if k.startswith(ours) and k.endswith("expert_bias")]
            if any(b.abs().max() > 0 for b in bias):
                raise UserError(f"layer {i} routes with a nonzero expert_bias, which Qwen3MoE cannot express")
            out[hf + "mlp.gate.weight"] = sd[ours + "mlp.router.weight"]
            for j in range(cfg.n_experts):
                for a, b in mlp:
                    out[f"{hf}mlp.experts.{j}.{b}.weight"] = sd[f"{ours}mlp.experts.{a}"][j]
        else:
            for a, b in mlp:
                out[f"{hf}mlp.{b}.weight"] = sd[f"{ours}mlp.{a}.weight"]
    return out


def byte_chars():
    """GPT-2's byte -> character map, which byte-level BPE files use to write bytes as text: printable bytes
    stand for themselves, the others for the characters from U+0100 on."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    others = [b for b in range(256) if b not in printable]
    return {b: chr(b) for b in printable} | {b: chr(256 + i) for i, b in enumerate(others)}


def save_tokenizer(tok, out_dir, max_len):
    """Write our tokenizer as tokenizer.json (a `tokenizers` byte-level BPE that encodes ordinary text to the same
    ids) and tokenizer_config.json, which AutoTokenizer.from_pretrained(out_dir) loads. Ordinary text: one that
    spells a special token ("<|endoftext|>") gets that token there, where we encode its characters.

    tiktoken merges, within each piece its regex cuts, the adjacent pair whose joined bytes rank lowest; a BPE
    merge list in the order of the joined token's rank does the same. Special tokens keep their ids, and BOS
    (where the tokenizer has one) starts every encoding, as our contexts start.
    """
    from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, pre_tokenizers, processors

    ranks = tok.enc._mergeable_ranks  # tiktoken keeps ranks and regex in private fields
    chars = byte_chars()  # a translation table: latin-1 decodes byte b to chr(b)
    text = {token: token.decode("latin-1").translate(chars) for token in ranks}
    merges = []
    for token, rank in ranks.items():
        merges += [(rank, ranks[token[:i]], ranks[token[i:]], text[token[:i]], text[token[i:]])
                   for i in range(1, len(token)) if token[:i] in ranks and token[i:] in ranks]
    merges.sort()
    specials = tok.enc._special_tokens
    vocab = {text[token]: rank for token, rank in ranks.items()} | specials
    # ignore_merges: a piece that is a token is that token, as tiktoken looks it up before merging
    out = Tokenizer(models.BPE(vocab, [m[3:] for m in merges], ignore_merges=True))
    # tiktoken's possessive X{1,3}+ (cl100k_base) is "one or more X{1,3}" to the Oniguruma regexes of tokenizers;
    # where it ends an alternative, as in tiktoken's patterns, a greedy X{1,3} matches the same
    pattern = re.sub(r"(\{\d+(?:,\d*)?\})\+", r"\1", tok.enc._pat_str)
    out.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.Split(Regex(pattern), "isolated"),
                                                 pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    out.decoder = decoders.ByteLevel()
    out.add_special_tokens([AddedToken(s, special=True, normalized=False) for s in specials])
    names = {i: s for s, i in specials.items()}
    if tok.bos is not None:
        bos = names[tok.bos]
        out.post_processor = processors.TemplateProcessing(single=f"{bos} $A", pair=f"{bos} $A {bos} $B",
                                                           special_tokens=[(bos, tok.bos)])
    out.save(os.path.join(out_dir, "tokenizer.json"))
    config = {"tokenizer_class": "PreTrainedTokenizerFast", "bos_token": names.get(tok.bos),
              "eos_token": names[tok.eot], "add_bos_token": tok.bos is not None, "add_eos_token": False,
              "clean_up_tokenization_spaces": False, "model_max_length": max_len}
    with open(os.path.join(out_dir, "tokenizer_config.json"), "w") as f:
        json.dump(config, f, indent=1)


def export_hf(ckpt_path, out_dir):
    """Write what AutoModelForCausalLM and AutoTokenizer.from_pretrained(out_dir) load: config.json,
    model.safetensors (float32), tokenizer.json and tokenizer_config.json. Returns the model class."""
    model, ckpt = load_checkpoint(ckpt_path)
    tok = checkpoint_tokenizer(ckpt["config"])
    config = hf_config(model.cfg, tok)
    weights = hf_state_dict(model.state_dict(), model.cfg)
    if any(importlib.util.find_spec(m) is None for m in ("safetensors", "tokenizers")):
        raise UserError("export needs the safetensors and tokenizers packages: pip install transformers")
    from safetensors.torch import save_file
    # copies: safetensors refuses tensors that share memory, as the experts sliced from one tensor do
    weights = {k: v.detach().to("cpu", torch.float32).clone() for k, v in weights.items()}
    os.makedirs(out_dir, exist_ok=True)
    with open(os.path.join(out_dir, "config.json"), "w") as f:
        json.dump(config, f, indent=1)
    save_file(weights, os.path.join(out_dir, "model.safetensors"), metadata={"format": "pt"})
    save_tokenizer(tok, out_dir, model.cfg.max_seq_len)
    return config["architectures"][0]


# -----------------------------------------------------------------------------
# Sampling

@torch.no_grad()
def sample(model, tok, prompt, max_new_tokens=200, temperature=0.8, top_k=50, seed=0):
    """Continue `prompt`; temperature 0 is greedy; stops at the end-of-text token."""
    device = next(model.parameters()).device
    gen = torch.Generator(device=device).manual_seed(seed)
    ids = tok.document_prefix + tok.encode(prompt)  # where every training document starts
    x = torch.tensor([ids], device=device)
    for _ in range(max_new_tokens):
        logits = model(x[:, -model.cfg.max_seq_len:])[0, -1].float()
        if temperature == 0:
            nxt = logits.argmax().view(1)
        else:
            logits = logits / temperature
            if top_k:
                logits[logits < torch.topk(logits, min(top_k, logits.numel())).values[-1]] = -float("inf")
            nxt = torch.multinomial(F.softmax(logits, dim=-1), 1, generator=gen)
        if nxt.item() == tok.eot:
            break
        x = torch.cat([x, nxt.view(1, 1)], dim=1)
    return tok.decode(x[0, len(ids):].tolist())


# -----------------------------------------------------------------------------
# Command line

def positive_int(text):
    if int(text) < 1:
        raise argparse.ArgumentTypeError(f"{text} is not a positive integer")
    return int(text)


def non_negative_int(text):
    if int(text) < 0:
        raise argparse.ArgumentTypeError(f"{text} is negative")
    return int(text)


def non_negative_float(text):
    if not 0 <= float(text) < math.inf:  # NaN fails too
        raise argparse.ArgumentTypeError(f"{text} is not a finite number >= 0")
    return float(text)


def loss_tokens(text):
    return text if text == "all" else positive_int(str(int(float(text))))  # float: so that 1e6 works


def torch_device(name):
    """--device, checked here: a CUDA device the machine lacks would otherwise fail deep inside torch."""
    try:
        device = torch.device(name)
    except RuntimeError:
        raise UserError(f"--device {name}: not a torch device (cpu, cuda, cuda:1, mps, ...)") from None
    if device.type == "cuda" and (device.index or 0) >= torch.cuda.device_count():
        raise UserError(f"--device {name}: this machine has {torch.cuda.device_count()} CUDA devices (torch "
                        f"{torch.__version__}): use --device cpu")
    return device


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("command", nargs="?", default="eval", choices=["eval", "export", "sample"])
    p.add_argument("--ckpt", required=True, help="a checkpoint written by train.py")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--batch_size", type=positive_int, default=None,
                   help="rows per forward pass (tasks: 16; loss: the run's)")
    p.add_argument("--tasks", default="", help=f"comma-separated, or 'all': {','.join(TASKS)}")
    p.add_argument("--limit", type=positive_int, default=None, help="first N documents per task (per subject for mmlu)")
    p.add_argument("--data_dir", default=None, help="offline copies (layout of ../shared/data/evals); default: the hub")
    p.add_argument("--truncate_long", action="store_true",
                   help="score a continuation longer than the model's window on its last tokens (else refused)")
    p.add_argument("--loss_data", default=None, help="held-out loss: a folder prepared by data.py (default: the run's)")
    p.add_argument("--loss_tokens", type=loss_tokens, default=None,
                   help="held-out positions to score, or 'all': the whole val split (default: the run's eval_tokens, "
                        "the rows train.py's val_loss reads)")
    p.add_argument("--out", default=None, help="export: output directory")
    p.add_argument("--prompt", default="")
    p.add_argument("--max_new_tokens", type=non_negative_int, default=200)
    p.add_argument("--temperature", type=non_negative_float, default=0.8, help="0: greedy")
    p.add_argument("--top_k", type=non_negative_int, default=50, help="0: no top-k cut")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args()

    if args.command == "export":
        if not args.out:
            p.error("export needs --out DIR")
        print(f"wrote {export_hf(args.ckpt, args.out)} and its tokenizer to {args.out}")
        return

    device = torch_device(args.device)
    model, ckpt = load_checkpoint(args.ckpt, device)
    config = ckpt["config"]
    tok = checkpoint_tokenizer(config)
    if args.command == "sample":
        text = sample(model, tok, args.prompt, args.max_new_tokens, args.temperature, args.top_k, args.seed)
        print(args.prompt + text)
        return

    t0 = time.time()
    window = model.cfg.max_seq_len
    if args.tasks:
        names = TASKS if args.tasks == "all" else [t.strip() for t in args.tasks.split(",") if t.strip()]
        tasks = {name: load_task(name, args.data_dir, args.limit) for name in names}
        # every task's requests before any is scored, so that a long continuation is refused at once
        requests = {name: task_requests(tok, name, docs, window, args.truncate_long) for name, docs in tasks.items()}
        rows = []
        for name, docs in tasks.items():
            rows += evaluate_task(model, name, docs, *requests[name], window, args.batch_size or 16, device)
            if requests[name][1]:
                print(f"{name}: {requests[name][1]} continuations longer than the window of {window} tokens were "
                      f"scored on their last {window} tokens")
        source = os.path.abspath(args.data_dir) if args.data_dir else "hub"
        bos = "a BOS token starts every context" if tok.bos is not None else "no BOS (the tokenizer has none)"
        print(f"{config['tokenizer']} tokenizer: {bos}")
    else:
        data_dir = args.loss_data or config["data_dir"]
        # by default the rows train.py's val_loss reads (eval_tokens; older runs: eval_iters batches), so the two agree
        run = config.get("eval_tokens") or config["eval_iters"] * config["batch_size"] * config["seq_len"]
        positions = args.loss_tokens or run
        batches = heldout_batches(data_dir, config["tokenizer"], config["seq_len"], positions,
                                  args.batch_size or config["batch_size"])
        r = heldout_loss(model, batches, token_bytes(tok))
        task = "heldout_val_all" if positions == "all" else "heldout_val"
        rows = [{"task": task, "metric": m, "value": r[m], "stderr": None, "n": r["tokens"]}
                for m in ("loss", "ppl", "bpb")]
        source = os.path.abspath(data_dir)
    print_table(rows)
    suffix = f"_limit{args.limit}" if args.limit and args.tasks else ""
    path = os.path.join(os.path.dirname(os.path.abspath(args.ckpt)), f"eval_step{ckpt['step']}{suffix}.json")
    write_results(path, [{**r, "data": source} for r in rows], ckpt["step"],
                  {"checkpoint": os.path.abspath(args.ckpt), "tokenizer": config["tokenizer"],
                   "bos_prepended": tok.bos is not None})
    print(f"step {ckpt['step']}, {time.time() - t0:.1f}s; results in {path}")


if __name__ == "__main__":
    try:
        main()
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(1)
