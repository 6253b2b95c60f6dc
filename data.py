"""
Data for tst: text corpora -> token shards, prepared once -> the rows both TST phases train on (TokenLoader).

    python data.py --source stdlib --tokenizer bytes --out_dir data/stdlib_bytes
    python data.py --source dclm --tokenizer llama3:tokenizer.model --out_dir data/dclm --max_tokens 105e9

`python data.py --help` lists the sources and tokenizers. The first documents (at least --val_tokens tokens) become the
val split, the rest the train shards; re-running the same command resumes an interrupted or extended preparation.
Every document is preceded by the tokenizer's document prefix: end-of-text, then BOS where the tokenizer has one.

Shard OUT_DIR/{split}_{index:06d}.bin: a 24-byte little-endian header (b"TSTTOKEN", uint32 format version, uint32 bytes
per token: 2 or 4, uint64 token count), then the tokens, little-endian; meta.json lists the shards (each with its
largest token id, max_id) and the settings.

Rows: a split is one stream, its shards in order, cut into chunks of chunk_tokens tokens (a chunk never spans two
shards). Epoch e serves the chunks in the order np.random.default_rng([seed, e]).permutation(n_chunks), each after the
separator: the document prefix again (meta.json's eot, then bos where there is one), since a chunk mostly starts
mid-document and a join of two chunks, two unrelated places of the corpus, must read as a document boundary. Epoch
follows epoch in one endless stream. next_rows(L) cuts the next world_size * batch_size rows from it, back to back,
each L + 1 consecutive tokens of the stream, separators included (L inputs; the labels are the same tokens shifted by
one, so each row's last token is the next row's first); rank r takes rows r * batch_size ... (r + 1) * batch_size - 1.
The position in that stream is the loader's whole state, the same on every rank: a checkpoint from any rank resumes
all of them, under any world size or row length.
"""

import argparse
import base64
import collections
import concurrent.futures
import glob
import hashlib
import itertools
import json
import os
import re
import shlex
import struct
import sysconfig
import time
from pathlib import Path

import numpy as np
import tiktoken
import tiktoken.load

import cli
from cli import UserError

# -----------------------------------------------------------------------------
# Tokenizers

# Llama 3's pre-tokenisation pattern, as in Meta's llama/tokenizer.py
LLAMA3_PATTERN = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"
                  r"|\s*[\r\n]+|\s+(?!\S)|\s+")
LLAMA3_SPECIALS = [
    "<|begin_of_text|>", "<|end_of_text|>", "<|reserved_special_token_0|>", "<|reserved_special_token_1|>",
    "<|reserved_special_token_2|>", "<|reserved_special_token_3|>", "<|start_header_id|>", "<|end_header_id|>",
    "<|reserved_special_token_4|>", "<|eot_id|>",
] + [f"<|reserved_special_token_{i}|>" for i in range(5, 251)]


class Tokenizer:
    """A tiktoken encoding and the ids training needs: eot goes between documents, bos is None where there is none."""

    def __init__(self, name, enc, eot, bos=None):
        self.name, self.enc, self.eot, self.bos, self.n_vocab = name, enc, eot, bos, enc.n_vocab
        # What precedes every document: end-of-text, so that documents (and shards) joined end to end stay
        # separated, then BOS where the tokenizer has one (Llama 3: as torchtitan trains and as the evaluation
        # harness scores, every text starts after <|begin_of_text|>).
        self.document_prefix = [eot] + ([bos] if bos is not None else [])

    def encode(self, text):
        # ordinary text only: a document that quotes "<|endoftext|>" must not inject a document boundary
        return self.enc.encode_ordinary(text)

    def decode(self, ids):
        return self.enc.decode([int(i) for i in ids])


def get_tokenizer(name):
    """bytes (offline: the UTF-8 bytes, 256 is end-of-text), a tiktoken encoding name (gpt2, cl100k_base, o200k_base:
    downloaded once into $TIKTOKEN_CACHE_DIR) or llama3:PATH (Llama 3's original tokenizer.model)."""
    if name == "bytes":
        # tiktoken with no merges is plain UTF-8 bytes, and faster than doing it in Python
        ranks = {bytes([b]): b for b in range(256)}
        enc = tiktoken.Encoding("bytes", pat_str=r"[\s\S]{1,64}", mergeable_ranks=ranks,
                                special_tokens={"<|endoftext|>": 256})
        return Tokenizer(name, enc, eot=256)
    if name.startswith("llama3:"):
        ranks = _read_ranks(name[len("llama3:"):])
        specials = {token: len(ranks) + i for i, token in enumerate(LLAMA3_SPECIALS)}
        enc = tiktoken.Encoding("llama3", pat_str=LLAMA3_PATTERN, mergeable_ranks=ranks, special_tokens=specials)
        return Tokenizer(name, enc, eot=specials["<|end_of_text|>"], bos=specials["<|begin_of_text|>"])
    if name not in tiktoken.list_encoding_names():
        raise UserError(f"unknown tokenizer {name!r}: use bytes, llama3:PATH or one of "
                        f"{', '.join(tiktoken.list_encoding_names())}")
    try:
        enc = tiktoken.get_encoding(name)
    except OSError as e:  # tiktoken's download failed
        raise UserError(f"tiktoken could not download the {name!r} encoding ({e}). Without network, point "
                        f"TIKTOKEN_CACHE_DIR at a cache seeded on a machine with network (see the README)") from e
    return Tokenizer(name, enc, eot=enc.eot_token)


def _read_ranks(path):
    """A tiktoken-format BPE file. Read here rather than by tiktoken.load, which would write a copy into its cache."""
    if not os.path.isfile(path):
        raise UserError(f"tokenizer file {path!r} not found (tokenizer 'llama3:{path}'): give the path of "
                        f"Llama 3's original tokenizer.model")
    ranks = {}
    for n, line in enumerate(Path(path).read_bytes().splitlines(), 1):
        try:
            token, rank = line.split()
            ranks[base64.b64decode(token, validate=True)] = int(rank)
        except ValueError:
            raise UserError(f"{path}, line {n}: {line[:60]!r} is not 'base64(token bytes) rank': the "
                            f"llama3: tokenizer needs the tiktoken-format tokenizer.model (Meta's original/ folder)"
                            ) from None
    if sorted(ranks.values()) != list(range(len(ranks))) or any(bytes([b]) not in ranks for b in range(256)):
        raise UserError(f"{path}: the ranks must be 0..{len(ranks) - 1}, each once, and include all 256 single bytes")
    return ranks


def known_vocab_size(name):
    """The number of ids of tokenizer `name` where that is cheap to know, else None: bytes; llama3:PATH where the file
    is (a rank a line, then the specials); a tiktoken encoding that loads without the network."""
    if name == "bytes":
        return get_tokenizer(name).n_vocab
    if name.startswith("llama3:"):
        path = name[len("llama3:"):]
        return len(Path(path).read_bytes().splitlines()) + len(LLAMA3_SPECIALS) if os.path.isfile(path) else None
    if name not in tiktoken.list_encoding_names():
        return None  # no tokenizer of data.py's (a folder made by hand)
    # tiktoken downloads an encoding missing from its cache: not for a check, which must never wait on a network
    download, tiktoken.load.read_file = tiktoken.load.read_file, _no_download
    try:
        return tiktoken.get_encoding(name).n_vocab
    except OSError:
        return None
    finally:
        tiktoken.load.read_file = download


def _no_download(url):
    raise OSError(f"{url} is not in tiktoken's cache")


# -----------------------------------------------------------------------------
# Sources: each is an iterator over documents (str), checked when it is opened, before any document is read

HF_NAMED = {"dclm": "mlfoundations/dclm-baseline-1.0", "fineweb-edu": "HuggingFaceFW/fineweb-edu"}
SOURCE_HELP = ("a SOURCE is stdlib, dclm, fineweb-edu[:CONFIG], hf:NAME[:CONFIG], a glob of local files, "
               "or a mix W*SOURCE,W*SOURCE,...")
WEIGHTED = re.compile(r"^(\d+\.?\d*|\.\d+)\*(.+)$")


def _documents(source, text_field="text"):
    parts = source.split(",")
    if len(parts) == 1 and not WEIGHTED.match(source):
        return _open_source(source, text_field)
    weights, streams = [], []
    for part in parts:
        m = WEIGHTED.match(part)
        weight, spec = (float(m[1]), m[2]) if m else (1.0, part)
        if weight <= 0:
            raise UserError(f"mix {source!r}: weight of {spec!r} must be positive")
        weights.append(weight)
        streams.append(_open_source(spec, text_field))
    return _mix(streams, weights, parts)


def _open_source(spec, text_field):
    if spec == "stdlib":
        return _stdlib_documents()
    name, _, config = spec.partition(":")
    if name in HF_NAMED:
        return _hf_documents(spec, HF_NAMED[name], config or None, None, text_field)
    if name == "hf":
        path, _, config = config.partition(":")
        return _hf_documents(spec, path, config or None, None, text_field)
    files = sorted(f for f in glob.glob(spec, recursive=True) if os.path.isfile(f))
    if not files:
        raise UserError(f"source {spec!r}: no such dataset or local file ({SOURCE_HELP})")
    kinds = {_file_kind(f) for f in files}
    if len(kinds) > 1:
        raise UserError(f"source {spec!r} matches files of several kinds ({sorted(kinds)}): "
                        f"give one glob per kind, as a mix")
    kind = kinds.pop()
    if kind == "text":
        return (Path(f).read_text("utf-8", errors="replace") for f in files)
    return _hf_documents(spec, kind, None, files, text_field)


def _file_kind(path):
    name = re.sub(r"\.(gz|xz|bz2|zst|zstd)$", "", path.lower())
    return "json" if name.endswith((".jsonl", ".json")) else "parquet" if name.endswith(".parquet") else "text"


def _stdlib_documents():
    root = sysconfig.get_paths()["stdlib"]
    files = []
    for folder, subfolders, names in os.walk(root):
        subfolders[:] = [s for s in subfolders if s not in ("site-packages", "dist-packages")]
        files += [os.path.relpath(os.path.join(folder, n), root) for n in names if n.endswith(".py")]
    # a fixed shuffle (by hash of the path) rather than alphabetical order, so that the first files, which become
    # the validation split, are a fair sample of the library and not just its private modules
    files.sort(key=lambda f: hashlib.sha1(f.replace(os.sep, "/").encode()).hexdigest())
    return (Path(root, f).read_text("utf-8", errors="replace") for f in files)


def _hf_documents(spec, path, config, data_files, text_field):
    import datasets  # here, not at the top: it takes a second to import and only these sources need it

    try:
        rows = datasets.load_dataset(path, config, data_files=data_files, split="train", streaming=True)
    except OSError as e:  # not on the hub, no network, no such config: datasets' messages name the cause
        raise UserError(f"source {spec!r} could not be opened: {e}") from e

    def documents():
        for row in rows:
            if text_field not in row:
                raise UserError(f"source {spec!r} has no column {text_field!r} (its columns: {sorted(row)}): "
                                f"pass --text_field")
            text = row[text_field]
            # checked here: a column of another type would fail inside a tokenizer process, far from its cause
            if text is not None and not isinstance(text, str):
                raise UserError(f"source {spec!r}: column {text_field!r} holds {type(text).__name__}, not text: "
                                f"pass the text column as --text_field")
            yield text or ""
    return documents()


def _mix(streams, weights, names):
    """The next document always comes from the source furthest below its share of characters so far."""
    taken = [0] * len(streams)  # characters taken from each source
    while True:
        i = min(range(len(streams)), key=lambda i: taken[i] / weights[i])
        text = next(streams[i], None)
        if text is None:
            print(f"\nmix: {names[i]} ran out; stopping here so that the mix keeps its weights")
            return
        taken[i] += len(text) + 1
        yield text


# -----------------------------------------------------------------------------
# Shards

MAGIC, VERSION = b"TSTTOKEN", 1
HEADER = struct.Struct("<8sIIQ")  # magic, version, bytes per token, token count
DTYPES = {"uint16": np.dtype("<u2"), "uint32": np.dtype("<u4")}
SPLITS = ("val", "train")


def write_shard(path, tokens, dtype):
    tokens = np.asarray(tokens)
    if len(tokens) and tokens.max() > np.iinfo(DTYPES[dtype]).max:
        raise ValueError(f"{path}: token id {tokens.max()} does not fit {dtype}: write uint32 shards")
    tmp = Path(f"{path}.tmp")  # renamed into place when complete, so a shard on disk is never half written
    with open(tmp, "wb") as f:
        f.write(HEADER.pack(MAGIC, VERSION, DTYPES[dtype].itemsize, len(tokens)))
        f.write(tokens.astype(DTYPES[dtype]).tobytes())
    os.replace(tmp, path)


def read_shard(path, fix="re-run the python data.py command that made it"):
    """The tokens of a shard, memory-mapped, after checking its header against the file; `fix` ends each complaint."""
    if not os.path.isfile(path):
        raise UserError(f"{path} is missing: {fix}")
    with open(path, "rb") as f:
        head = f.read(HEADER.size)
    if len(head) < HEADER.size or not head.startswith(MAGIC):
        raise UserError(f"{path} is not a tst token shard (bad magic {head[:8]!r}): {fix}")
    _, version, itemsize, n = HEADER.unpack(head)
    if version != VERSION or itemsize not in (2, 4):
        raise UserError(f"{path}: shard format version {version} with {itemsize}-byte tokens; this data.py reads "
                        f"version {VERSION} with 2 or 4: {fix}")
    if os.path.getsize(path) != HEADER.size + n * itemsize:
        raise UserError(f"{path} is truncated or damaged: its header promises {n:,} tokens "
                        f"({HEADER.size + n * itemsize:,} bytes), the file has {os.path.getsize(path):,} bytes: {fix}")
    return np.memmap(path, DTYPES["uint16" if itemsize == 2 else "uint32"], "r", offset=HEADER.size, shape=(n,))


def load_meta(data_dir):
    """meta.json of a prepared folder, checked against itself: complete, its vocabulary fits its dtype, and neither a
    shard (each one's largest id is recorded at preparation) nor the separator holds an id past its vocab_size."""
    path = Path(data_dir) / "meta.json"
    if not path.exists():
        how = f"prepare it (python data.py --help lists the sources and tokenizers) with {_command({}, data_dir)}"
        if not Path(data_dir).exists():
            raise UserError(f"data folder {data_dir} does not exist (a relative path is from the current directory, "
                            f"{os.getcwd()}): {how}")
        raise UserError(f"{path} not found: {data_dir} is not a prepared data folder: {how}")
    meta = _read_meta(path)
    if not meta["done"]:
        raise UserError(f"{data_dir} is only partly prepared: finish it with {_command(meta, data_dir)}")
    if meta["vocab_size"] - 1 > np.iinfo(DTYPES[meta["dtype"]]).max:
        raise UserError(f"{path}: vocab_size {meta['vocab_size']:,} does not fit dtype {meta['dtype']}: "
                        f"prepare again with --dtype uint32")
    for shard in meta["shards"]:
        if shard.get("max_id", -1) >= meta["vocab_size"]:
            raise UserError(f"{Path(data_dir) / shard['file']} holds token id {shard['max_id']:,} (as {path} "
                            f"records it), outside its vocab_size of {meta['vocab_size']:,}: meta.json or the shard "
                            f"has changed since preparation; restore it, or delete the folder and prepare it again "
                            f"with {_command(meta, data_dir)}")
    if max(_separator(meta)) >= meta["vocab_size"]:
        raise UserError(f"{path}: the separator {_separator(meta)} (eot, then bos) is outside its vocab_size of "
                        f"{meta['vocab_size']:,}: meta.json has changed since preparation; restore it, or delete the "
                        f"folder and prepare it again with {_command(meta, data_dir)}")
    return meta


def _separator(meta):
    """What the loader puts before each chunk: the tokenizer's document prefix (eot, then bos where there is one), from
    what meta.json records of the tokenizer."""
    return [meta["eot"]] + ([meta["bos"]] if meta["bos"] is not None else [])


META_KEYS = ("source", "tokenizer", "vocab_size", "dtype", "eot", "bos", "shards", "done")


def _read_meta(path):
    """meta.json's contents; if it is not what data.py writes, a UserError that says how to remake the folder."""
    try:
        meta = json.loads(path.read_text())
        problem = "" if isinstance(meta, dict) else "is not a JSON object"
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        meta, problem = {}, f"is not JSON ({e})"
    if not problem:
        missing = [key for key in META_KEYS if key not in meta]
        problem = f"lacks {', '.join(missing)}" if missing else ""
    if problem:
        raise UserError(f"{path} {problem}: it is damaged. Delete it and prepare the folder again with "
                        f"{_command(meta if isinstance(meta, dict) else {}, path.parent)}")
    return meta


def _command(meta, out_dir):
    """The python data.py command that (re)makes out_dir as meta describes it (SOURCE and TOKENIZER where it does not
    say)."""
    words = ["python", "data.py", "--source", meta.get("source", "SOURCE"), "--tokenizer",
             meta.get("tokenizer", "TOKENIZER"), "--out_dir", str(out_dir)]
    for flag, key in (("--val_tokens", "val_target"), ("--shard_tokens", "shard_tokens"),
                      ("--text_field", "text_field"), ("--dtype", "dtype"), ("--max_tokens", "max_tokens")):
        if meta.get(key) is not None:
            words += [flag, str(meta[key])]
    return shlex.join(words)


def check_token_ids(data_dir, vocab_size):
    """For train.py at start-up: every token id of data_dir inside a model of vocab_size ids, checked from meta.json
    alone, so that a folder of 105B tokens is not read again. Each shard's largest id (recorded at preparation) is
    below meta.json's vocab_size (load_meta), which is its tokenizer's (where that is cheap to know), which is at most
    vocab_size; shards prepared before their largest id was recorded are checked as the loader reads them. Raises a
    UserError that names the file and the fix; returns meta.json's contents."""
    meta = load_meta(data_dir)
    known = known_vocab_size(meta["tokenizer"])
    if known is not None and known != meta["vocab_size"]:
        raise UserError(f"{Path(data_dir) / 'meta.json'}: vocab_size {meta['vocab_size']:,}, but tokenizer "
                        f"{meta['tokenizer']!r} has {known:,} ids: it was edited since preparation; set it back to "
                        f"{known}, or delete the folder and prepare it again with {_command(meta, data_dir)}")
    if vocab_size < meta["vocab_size"]:
        recorded = [s for s in meta["shards"] if "max_id" in s]
        top = max(recorded, key=lambda s: s["max_id"], default=None)
        holds = f"; {Path(data_dir) / top['file']} holds id {top['max_id']:,}" if top else ""
        raise UserError(f"vocab_size={vocab_size:,} is smaller than the data's vocabulary ({meta['vocab_size']:,} ids, "
                        f"tokenizer {meta['tokenizer']}, in {data_dir}{holds}): use 0 (the data's) or "
                        f"{meta['vocab_size']:,} or more")
    return meta


# -----------------------------------------------------------------------------
# Preparation

BATCH_CHARS = 1 << 20  # text per tokenizer task: big enough to amortise the inter-process copy


def prepare(source, tokenizer, out_dir, *, val_tokens=1_000_000, shard_tokens=100_000_000, max_tokens=None,
            text_field="text", dtype=None, num_proc=None):
    """Tokenize SOURCE into shards in OUT_DIR (see the module docstring); returns meta.json's contents."""
    for name, value, least in (("val_tokens", val_tokens, 0), ("shard_tokens", shard_tokens, 1),
                               ("max_tokens", max_tokens, 1), ("num_proc", num_proc, 1)):
        if value is not None and value < least:
            raise UserError(f"--{name} {value}: it must be at least {least}")
    tok = get_tokenizer(tokenizer)
    dtype = dtype or ("uint16" if tok.n_vocab <= 1 << 16 else "uint32")
    if dtype not in DTYPES:
        raise UserError(f"--dtype {dtype}: shards hold uint16 or uint32 tokens")
    if tok.n_vocab - 1 > np.iinfo(DTYPES[dtype]).max:
        raise UserError(f"tokenizer {tokenizer!r} has {tok.n_vocab:,} ids, too many for --dtype {dtype}: "
                        f"use uint32 or leave --dtype unset")
    all_documents = _documents(source, text_field)  # opened, and so checked, before anything is written
    out_dir = Path(out_dir)
    try:
        out_dir.mkdir(parents=True, exist_ok=True)
    except OSError as e:  # a file in the way, a read-only parent
        raise UserError(f"--out_dir {out_dir} cannot be created ({e.strerror}): choose another --out_dir") from None
    if not os.access(out_dir, os.W_OK):
        raise UserError(f"--out_dir {out_dir} is read-only: choose another --out_dir")
    settings = {"source": source, "tokenizer": tokenizer, "vocab_size": tok.n_vocab, "dtype": dtype, "eot": tok.eot,
                "bos": tok.bos, "text_field": text_field, "val_target": val_tokens, "shard_tokens": shard_tokens}
    meta = _resume(out_dir, settings)
    if meta["done"] and (meta["exhausted"] or max_tokens is not None and meta["train_tokens"] >= max_tokens):
        print(f"{out_dir}: already prepared: {meta['train_tokens']:,} train and {meta['val_tokens']:,} val tokens")
        return meta

    t0 = shown = time.time()
    before = meta["train_tokens"] + meta["val_tokens"]
    meta.update(done=False, max_tokens=max_tokens)
    documents = itertools.islice(all_documents, meta["docs"], None)
    split = "val" if meta["val_tokens"] < val_tokens else "train"
    shard, shard_len, exhausted = [], 0, True
    for tokens in _encode(_batches(documents), tok, dtype, num_proc or os.cpu_count()):
        meta["docs"] += 1
        shard.append(tokens)
        shard_len += len(tokens)
        meta[f"{split}_tokens"] += len(tokens)
        if split == "val" and meta["val_tokens"] >= val_tokens or shard_len >= shard_tokens:
            _finish_shard(out_dir, meta, split, shard)
            shard, shard_len, split = [], 0, "train" if meta["val_tokens"] >= val_tokens else "val"
        if max_tokens is not None and meta["train_tokens"] >= max_tokens:
            exhausted = False
            break
        if time.time() - shown > 1:
            shown = time.time()
            rate = (meta["train_tokens"] + meta["val_tokens"] - before) / (shown - t0)
            done = f" ({meta['train_tokens'] / max_tokens:.0%})" if max_tokens else ""
            print(f"\r{out_dir}: {meta['docs']:,} documents, {meta['val_tokens']:,} val + {meta['train_tokens']:,} "
                  f"train tokens{done}, {rate:,.0f} tokens/s", end="", flush=True)
    if shard_len:
        _finish_shard(out_dir, meta, split, shard)
    if shown > t0:
        print()  # past the progress line
    if meta["train_tokens"] == 0:
        # nothing is left behind (meta.json comes with the first train shard): the retry may use other settings
        for shard in meta["shards"]:
            (out_dir / shard["file"]).unlink()
        if not any(out_dir.iterdir()):
            out_dir.rmdir()
        raise UserError(f"source {source!r} gave {meta['docs']:,} documents and {meta['val_tokens']:,} tokens, "
                        f"none left for training after the {val_tokens:,} validation tokens: give more data or a "
                        f"smaller --val_tokens")
    meta.update(done=True, exhausted=exhausted)
    _write_meta(out_dir, meta)
    written = meta["train_tokens"] + meta["val_tokens"] - before
    print(f"{out_dir}: wrote {written:,} tokens in {time.time() - t0:.1f}s; it holds {meta['train_tokens']:,} train "
          f"and {meta['val_tokens']:,} val tokens from {meta['docs']:,} documents in {len(meta['shards'])} shards")
    return meta


def _resume(out_dir, settings):
    """meta.json of an earlier run into out_dir, cut back to its intact shards; a fresh one if there is none."""
    path = out_dir / "meta.json"
    if not path.exists():
        return {"version": VERSION, **settings, "docs": 0, "train_tokens": 0, "val_tokens": 0, "shards": [],
                "done": False, "exhausted": False}
    meta = _read_meta(path)
    changed = {k: (meta.get(k), v) for k, v in settings.items() if meta.get(k) != v}
    if changed:
        raise UserError(f"{out_dir} holds data prepared with other settings {changed} (there, here; val_target is "
                        f"--val_tokens): use another --out_dir or delete that folder. It was made by "
                        f"{_command(meta, out_dir)}")
    for i, shard in enumerate(meta["shards"]):
        try:
            ok = len(read_shard(out_dir / shard["file"])) == shard["tokens"]
        except (OSError, UserError):
            ok = False
        if not ok:
            print(f"{out_dir / shard['file']} is missing or broken: preparing again from there")
            meta["shards"], meta["done"] = meta["shards"][:i], False
            break
    meta["docs"] = meta["shards"][-1]["docs_end"] if meta["shards"] else 0
    for split in SPLITS:
        meta[f"{split}_tokens"] = sum(s["tokens"] for s in meta["shards"] if s["split"] == split)
    return meta


def _batches(documents):
    batch, chars = [], 0
    for text in documents:
        batch.append(text)
        chars += len(text)
        if chars >= BATCH_CHARS:
            yield batch
            batch, chars = [], 0
    if batch:
        yield batch


def _encode(batches, tok, dtype, num_proc):
    """The token arrays of the documents, in order, tokenized by num_proc processes."""
    # concurrent.futures, not multiprocessing.Pool, which can hang: leaving `with Pool` early (--max_tokens) kills the
    # workers while the pool's thread may be part way through sending one a task, several pipe buffers long, which
    # then waits forever for a reader, and the pool for it; and a Pool waits forever for the task of a worker that
    # died. The executor finishes the tasks it has sent before it stops, and fails those of a worker that died.
    # The workers get the tokenizer built and checked here, so that no worker fails to start.
    with concurrent.futures.ProcessPoolExecutor(num_proc, initializer=_start_worker,
                                                initargs=(tok, DTYPES[dtype])) as pool:
        pending = collections.deque()  # bounded, rather than pool.map, which would read a streamed corpus far ahead
        try:
            for batch in batches:
                pending.append(pool.submit(_encode_batch, batch))
                if len(pending) > 2 * num_proc:
                    yield from pending.popleft().result()
            while pending:
                yield from pending.popleft().result()
        except concurrent.futures.process.BrokenProcessPool:
            raise UserError("a tokenizer process died (the system kills the largest processes when memory runs "
                            "out): re-run the same command, which resumes after the last shard written, with a "
                            "smaller --num_proc if memory is short") from None
        finally:
            for task in pending:
                task.cancel()  # those not sent to a worker yet


def _start_worker(tok, dtype):
    global _worker
    _worker = tok, dtype


def _encode_batch(texts):
    tok, dtype = _worker
    return [np.array(tok.document_prefix + tok.encode(text), dtype) if text else np.empty(0, dtype) for text in texts]


def _finish_shard(out_dir, meta, split, tokens):
    name = f"{split}_{sum(s['split'] == split for s in meta['shards']):06d}.bin"
    tokens = np.concatenate(tokens)
    write_shard(out_dir / name, tokens, meta["dtype"])
    # its largest id, so that a model too small for the data is refused at start-up without reading the shards again
    meta["shards"].append({"file": name, "split": split, "tokens": len(tokens), "docs_end": meta["docs"],
                           "max_id": int(tokens.max(initial=0))})
    # no meta.json before the first train shard: a preparation that fails sooner (a source too small for
    # --val_tokens, an interruption) does not tie the folder to its settings, and a re-run starts afresh
    if split == "train":
        _write_meta(out_dir, meta)


def _write_meta(out_dir, meta):
    tmp = out_dir / "meta.json.tmp"
    tmp.write_text(json.dumps(meta, indent=1))
    os.replace(tmp, out_dir / "meta.json")


# -----------------------------------------------------------------------------
# Loader

CHUNK_TOKENS = 1 << 16  # the unit of shuffling


def _split_shards(data_dir, split):
    """meta.json and the shards of one split, each checked against meta.json now rather than hours into a run; and what
    to do about a bad one."""
    meta = load_meta(data_dir)
    shards = [s for s in meta["shards"] if s["split"] == split]
    if not shards:
        present = sorted({s["split"] for s in meta["shards"]})
        raise UserError(f"{data_dir} has no {split!r} split (it has {present}): prepare the data into another "
                        f"--out_dir with --val_tokens above 0 for a val split")
    fix = f"re-run {_command(meta, data_dir)}"
    for shard in shards:
        path = Path(data_dir) / shard["file"]
        tokens = read_shard(path, fix)
        if len(tokens) != shard["tokens"] or tokens.dtype != DTYPES[meta["dtype"]]:
            raise UserError(f"{path} holds {len(tokens):,} {tokens.dtype} tokens, meta.json says "
                            f"{shard['tokens']:,} {meta['dtype']}: {fix}")
    return meta, shards, f"delete it and {fix}"


def _check_ids(tokens, path, start, vocab_size, fix):
    """Tokens [start, start + len(tokens)) of the shard at path, against the data's vocabulary: an id past it fails
    deep inside the model (an index error; a device-side assert on CUDA), far from its cause. Cheap next to reading
    them; it covers folders prepared before each shard's largest id was recorded, and shards changed since."""
    if len(tokens) and tokens.max() >= vocab_size:
        at = int(np.argmax(tokens >= vocab_size))
        raise UserError(f"{path} holds token id {int(tokens[at]):,} (its token {start + at:,}), outside the data's "
                        f"vocabulary of {vocab_size:,} ids (meta.json's vocab_size): the shard is damaged or belongs "
                        f"to another folder: {fix}")


class TokenLoader:
    """Rows for either TST phase from one split, as the module docstring gives them.

    tokens: the split's size; epoch_tokens: one epoch of the stream, the tokens and a separator before each chunk;
    position: tokens of the endless stream consumed by all ranks so far; epoch: position // epoch_tokens, announced on
    rank 0 each time it grows; vocab_size: from meta.json; separator: the tokens before each chunk.
    """

    def __init__(self, data_dir, split, batch_size, *, seed=0, rank=0, world_size=1, chunk_tokens=CHUNK_TOKENS):
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} is not in 0..world_size-1 = 0..{world_size - 1}")
        self.data_dir, self.split, self.batch_size = Path(data_dir), split, batch_size
        self.seed, self.rank, self.world_size, self.chunk_tokens = seed, rank, world_size, chunk_tokens
        meta, shards, self._fix = _split_shards(data_dir, split)
        self.vocab_size = meta["vocab_size"]
        self._dtype = DTYPES[meta["dtype"]]
        self.separator = np.array(_separator(meta), self._dtype)
        self._files = [self.data_dir / s["file"] for s in shards]
        # chunk i is tokens [start, start + length) of shard _shard[i]
        chunks = np.array([(i, start, min(chunk_tokens, s["tokens"] - start))
                           for i, s in enumerate(shards) for start in range(0, s["tokens"], chunk_tokens)])
        self._shard, self._start, self._length = chunks.T
        self.tokens = sum(s["tokens"] for s in shards)
        self.epoch_tokens = self.tokens + len(chunks) * len(self.separator)
        self.position = 0
        self.epoch = 0
        self._epoch_order = (None, None, None)  # the last epoch asked for, its order of chunks, where they end

    def _order(self, epoch):
        """The chunks in epoch `epoch`'s order, and where each ends (its separator before it) in that epoch's stream."""
        if self._epoch_order[0] != epoch:
            order = np.random.default_rng([self.seed, epoch]).permutation(len(self._length))
            self._epoch_order = (epoch, order, np.cumsum(len(self.separator) + self._length[order]))
        return self._epoch_order[1:]

    def _read(self, position, n):
        out = np.empty(n, self._dtype)
        sep = self.separator
        done = 0
        while done < n:
            epoch, q = divmod(position + done, self.epoch_tokens)
            order, ends = self._order(epoch)
            k = np.searchsorted(ends, q, side="right")  # stream position q is in chunk order[k] or the separator before
            c = order[k]
            into = q - (ends[k] - self._length[c] - len(sep))  # tokens from the separator's start to q
            if into < len(sep):
                take = min(n - done, len(sep) - into)
                out[done:done + take] = sep[into:into + take]
            else:
                start = self._start[c] + into - len(sep)
                take = min(n - done, ends[k] - q)
                # map the shard for each read rather than keeping thousands open: no file-handle limit, and the pages
                # read are not charged to this process for the whole run
                tokens = read_shard(self._files[self._shard[c]])[start:start + take]
                _check_ids(tokens, self._files[self._shard[c]], start, self.vocab_size, self._fix)
                out[done:done + take] = tokens
            done += take
        return out

    def next_rows(self, L):
        """(batch_size, L+1) int64: this rank's rows of the next world_size*batch_size rows of L tokens (+1 label)."""
        if L + 1 > self.tokens:
            raise UserError(f"a row of {L + 1:,} tokens is longer than the whole {self.split!r} split of "
                            f"{self.data_dir} ({self.tokens:,} tokens): prepare more data (--val_tokens for val) "
                            f"or use a smaller T or s")
        B = self.batch_size
        tokens = self._read(self.position + self.rank * B * L, B * L + 1)
        self.position += self.world_size * B * L
        if self.position // self.epoch_tokens > self.epoch:
            self.epoch = self.position // self.epoch_tokens
            if self.rank == 0:
                print(f"TokenLoader: the {self.split} split of {self.data_dir} ({self.tokens:,} tokens) has been "
                      f"served in full; epoch {self.epoch} starts, repeating it in a new order", flush=True)
        rows = np.lib.stride_tricks.sliding_window_view(tokens, L + 1)[::L]  # a view: row i starts at token i*L
        import torch  # here, not at the top: preparing data needs no torch, whose import takes seconds
        return torch.from_numpy(rows.astype(np.int64))

    def state_dict(self):
        return {"split": self.split, "seed": self.seed, "tokens": self.tokens, "chunk_tokens": self.chunk_tokens,
                "separator": [int(t) for t in self.separator], "position": int(self.position)}

    def load_state_dict(self, state):
        if "separator" not in state:
            raise UserError("the checkpoint's loader state has no 'separator': it is from a data.py that joined chunks "
                            "without one, and its position counts that other stream; resume with that version of "
                            "data.py, or start the run afresh")
        mine = self.state_dict()
        changed = {k: (state[k], mine[k]) for k in mine if k != "position" and state[k] != mine[k]}
        if changed:
            raise UserError(f"the checkpoint's loader read another stream {changed} (checkpoint, here): resume "
                            f"with the same data folder, split and seed")
        self.position = state["position"]
        self.epoch = self.position // self.epoch_tokens


def validation_rows(data_dir, seq_len, max_rows):
    """The fixed held-out rows: up to max_rows rows of seq_len + 1 tokens from the start of the val split, in order,
    each row's last token the next row's first, so that every val token is scored at most once. The same rows for
    every process count and every evaluation; train.py splits them among the ranks, eval.py reads the same."""
    if seq_len < 1 or max_rows < 1:
        raise UserError(f"asked for at most {max_rows} validation rows of seq_len {seq_len}: both must be at least 1 "
                        f"(ask for at least one row's worth of tokens)")
    meta, shards, fix = _split_shards(data_dir, "val")
    split_tokens = sum(s["tokens"] for s in shards)
    n_rows = min(max_rows, (split_tokens - 1) // seq_len)
    if n_rows < 1:
        raise UserError(f"the val split of {data_dir} ({split_tokens:,} tokens) is shorter than one row of "
                        f"{seq_len + 1} tokens: prepare the data again, into another --out_dir, with a larger "
                        f"--val_tokens")
    need, parts = n_rows * seq_len + 1, []
    for shard in shards:  # only the prefix the rows cover
        path = Path(data_dir) / shard["file"]
        parts.append(read_shard(path)[:need])
        _check_ids(parts[-1], path, 0, meta["vocab_size"], fix)
        need -= len(parts[-1])
        if need == 0:
            break
    import torch  # as in next_rows
    tokens = torch.from_numpy(np.concatenate(parts).astype(np.int64))
    return tokens.unfold(0, seq_len + 1, seq_len)


# -----------------------------------------------------------------------------

def count(text):
    """A whole number of tokens, written 105e9 if need be."""
    value = float(text)
    if not value.is_integer():  # also inf and nan; argparse reports the ValueError as "invalid count value"
        raise ValueError(text)
    return int(value)


def main(argv):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--source", required=True, help=(
        "stdlib (the .py files of this Python's standard library: offline, one document per file), dclm, "
        "fineweb-edu[:CONFIG] (e.g. sample-10BT), hf:NAME[:CONFIG] (any Hugging Face dataset: its train split, "
        "streamed), a glob of local files in quotes (*.jsonl, *.json, *.parquet, optionally .gz/.xz/.bz2/.zst, read "
        "through datasets; any other file is one document) or a mix by weight of characters, W*SOURCE,W*SOURCE,..."))
    parser.add_argument("--tokenizer", required=True, help=(
        "bytes (offline), a tiktoken encoding: gpt2, cl100k_base, o200k_base (downloaded once into "
        "$TIKTOKEN_CACHE_DIR), or llama3:PATH (Llama 3's original tokenizer.model)"))
    parser.add_argument("--out_dir", required=True)
    parser.add_argument("--val_tokens", type=count, default=1_000_000, help="held out, from the first documents")
    parser.add_argument("--shard_tokens", type=count, default=100_000_000)
    parser.add_argument("--max_tokens", type=count, default=None, help="stop after this many train tokens")
    parser.add_argument("--text_field", default="text", help="the text column of dataset sources")
    parser.add_argument("--dtype", choices=list(DTYPES), default=None, help="default: uint16 if the vocabulary fits")
    parser.add_argument("--num_proc", type=int, default=None, help="tokenizer processes (default: all cores)")
    args = parser.parse_args(argv)
    prepare(args.source, args.tokenizer, args.out_dir, val_tokens=args.val_tokens, shard_tokens=args.shard_tokens,
            max_tokens=args.max_tokens, text_field=args.text_field, dtype=args.dtype, num_proc=args.num_proc)


if __name__ == "__main__":
    cli.run(main)
