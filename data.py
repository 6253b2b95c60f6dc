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

Rows: a split is cut into windows of `window` tokens (the loader's setting: a multiple of every stage's row length,
s*T and T), each within one shard, plus the token after it as its last label; a shard's last few tokens that make no
whole window are not read. Epoch e visits the windows in a shuffled order (a pseudo-random permutation keyed by
[seed, e], computed in O(1) memory) and a row of L tokens is piece k of a window, its tokens [k*L, k*L + L]: a stage
of k pieces to a window takes piece 0 of its windows in that order, then piece 1, and so on; a new stage starts at the
windows the earlier ones did not touch. So the rows of a step, and those of consecutive steps, come from unrelated
places of the corpus (as in Megatron's shuffled sample index), a row never joins two places, and no token is read
twice in an epoch. next_rows(L) takes the next world_size * batch_size rows; rank r keeps rows r * batch_size ...
(r + 1) * batch_size - 1, so the global batch is the same for any world size. The epoch, the windows touched and the
rows served are the loader's whole state, the same on every rank: a checkpoint from any rank resumes all of them,
under any world size.
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
    shard (each one's largest id is recorded at preparation) nor the document prefix holds an id past its vocab_size."""
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
    if max(_document_prefix(meta)) >= meta["vocab_size"]:
        raise UserError(f"{path}: the document prefix {_document_prefix(meta)} (eot, then bos) is outside its vocab_size of "
                        f"{meta['vocab_size']:,}: meta.json has changed since preparation; restore it, or delete the "
                        f"folder and prepare it again with {_command(meta, data_dir)}")
    return meta


def _document_prefix(meta):
    """What precedes every document in the shards (eot, then bos where there is one), from meta.json."""
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


def shuffled(indices, n, key):
    """A pseudo-random permutation of range(n), evaluated at `indices` (an array): the same bijection for the same n
    and key, computed in O(1) memory, so that an epoch of a 100B-token split needs no stored order. A Feistel network
    on the smallest even number of bits that holds n is a bijection of that power of two; a value that lands at n or
    beyond is sent through it again until it is back in range ("cycle walking"), which keeps it a bijection of
    range(n) and costs fewer than 4 passes on average."""
    bits = max(2, (n - 1).bit_length() + (n - 1).bit_length() % 2)
    half, mask = np.uint64(bits // 2), np.uint64((1 << bits // 2) - 1)
    round_keys = np.random.default_rng(key).integers(0, 2**63, size=6, dtype=np.uint64)
    x = np.array(indices, dtype=np.uint64)
    walking = np.ones(len(x), dtype=bool)
    while walking.any():
        y = x[walking]
        for k in round_keys:
            left, right = y >> half, y & mask
            y = (right << half) | (left ^ (_scramble(right ^ k) & mask))
        x[walking] = y
        walking = x >= n
    return x.astype(np.int64)


def _scramble(z):
    """splitmix64's finaliser: every bit of z (uint64, an array) moves about half the bits of the result."""
    z = (z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
    z = (z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
    return z ^ (z >> np.uint64(31))


class TokenLoader:
    """Rows for every stage from one split, each from its own place in it, as the module docstring describes.

    tokens: the split's size; window: the tokens of a window, a multiple of every row length asked for; windows: how
    many the split holds; epoch: passes begun after the first, announced on rank 0; vocab_size: from meta.json.
    """

    def __init__(self, data_dir, split, batch_size, *, window, seed=0, rank=0, world_size=1):
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} is not in 0..world_size-1 = 0..{world_size - 1}")
        self.data_dir, self.split, self.batch_size, self.window = Path(data_dir), split, batch_size, window
        self.seed, self.rank, self.world_size = seed, rank, world_size
        meta, shards, self._fix = _split_shards(data_dir, split)
        self.vocab_size = meta["vocab_size"]
        self._files = [self.data_dir / s["file"] for s in shards]
        self.tokens = sum(s["tokens"] for s in shards)
        # shard i holds windows _first[i] .. _first[i + 1] - 1: `window` tokens each, and the token after the last
        # (its last label); the rest of a shard, fewer than window + 1 tokens, is never read
        self._first = np.cumsum([0] + [max(0, (s["tokens"] - 1) // window) for s in shards])
        self.windows = int(self._first[-1])
        if self.windows == 0:
            raise UserError(f"rows of {window + 1:,} tokens do not fit any shard of the {split!r} split of {data_dir} "
                            f"(its largest: {max(s['tokens'] for s in shards):,} tokens): prepare more data (a larger "
                            f"--shard_tokens, or --val_tokens for val) or use a smaller seq_len or s")
        self.epoch = 0
        self._start = 0  # windows of this epoch's order touched by stages before the current one
        self._row_tokens = 0  # the current stage's row length
        self._served = 0  # rows of that length served since it began (or since the epoch began)

    def next_rows(self, L):
        """(batch_size, L+1) int64: this rank's rows of the next world_size*batch_size rows of L tokens (+1 label)."""
        if L < 1 or self.window % L:
            raise ValueError(f"rows of {L} tokens: the loader's window of {self.window} tokens must be a whole "
                             f"number of rows (TokenLoader's window: a multiple of every stage's row length)")
        B = self.batch_size
        windows, pieces = self._claim(L, self.world_size * B)
        windows, pieces = windows[self.rank * B:(self.rank + 1) * B], pieces[self.rank * B:(self.rank + 1) * B]
        shards = np.searchsorted(self._first, windows, side="right") - 1
        rows = np.empty((B, L + 1), np.int64)
        for i, (shard, window, piece) in enumerate(zip(shards, windows, pieces)):
            start = (window - self._first[shard]) * self.window + piece * L
            # the shard is mapped for each read rather than kept open: thousands of shards need no file-handle
            # limit, and the pages read are not charged to this process for the whole run
            tokens = read_shard(self._files[shard])[start:start + L + 1]
            _check_ids(tokens, self._files[shard], start, self.vocab_size, self._fix)
            rows[i] = tokens
        import torch  # here, not at the top: preparing data needs no torch, whose import takes seconds
        return torch.from_numpy(rows)

    def _claim(self, L, n):
        """The next n rows of L tokens of all ranks -> (window, piece) of each; piece k of a window is its tokens
        [k*L, k*L + L]. A stage reads the windows that no earlier stage touched this epoch, in the epoch's shuffled
        order, and with k rows to a window it takes piece 0 of every one of them, then piece 1, ...: neighbouring
        rows come from unrelated windows, and no token is read twice in an epoch."""
        if L != self._row_tokens:  # a new stage: skip the windows the last one touched (all, once it read `left`)
            self._start += min(self._served, self.windows - self._start)
            self._row_tokens, self._served = L, 0
        windows, pieces = [], []
        while n:
            left = self.windows - self._start
            take = min(n, left * (self.window // L) - self._served)
            if take == 0:
                self.epoch, self._start, self._served = self.epoch + 1, 0, 0
                if self.rank == 0:
                    print(f"TokenLoader: every window of the {self.split} split of {self.data_dir} "
                          f"({self.windows:,} of {self.window:,} tokens) has been read; epoch {self.epoch} starts, "
                          f"in a new order", flush=True)
                continue
            p = self._served + np.arange(take)
            windows.append(shuffled(self._start + p % left, self.windows, [self.seed, self.epoch]))
            pieces.append(p // left)
            self._served += take
            n -= take
        return np.concatenate(windows), np.concatenate(pieces)

    def state_dict(self):
        return {"split": self.split, "seed": self.seed, "tokens": self.tokens, "window": self.window,
                "epoch": self.epoch, "start": self._start, "row_tokens": self._row_tokens, "served": self._served}

    def load_state_dict(self, state):
        if "window" not in state:
            raise UserError("the checkpoint's loader state has no 'window': it is from a data.py whose batches were "
                            "stretches of consecutive text, and it cannot continue in this one's order; resume with "
                            "that version of data.py, or start the run afresh")
        mine = self.state_dict()
        changed = {k: (state[k], mine[k]) for k in ("split", "seed", "tokens", "window") if state[k] != mine[k]}
        if changed:
            raise UserError(f"the checkpoint's loader read other windows {changed} (checkpoint, here): resume "
                            f"with the same data folder, split, seed, seq_len and bag sizes")
        self.epoch, self._start, self._row_tokens, self._served = (
            int(state[k]) for k in ("epoch", "start", "row_tokens", "served"))


def validation_rows(data_dir, seq_len, max_rows):
    """The fixed held-out rows: up to max_rows rows of seq_len + 1 tokens, spread evenly over the whole val split (its
    windows of seq_len tokens, the next token as the last label), so that an evaluation samples every part of it
    rather than its first documents. Distinct windows: every val token is scored at most once; max_rows at least the
    split's windows: all of them. The same rows for every run of a data folder and every process count; train.py
    splits them among the ranks, eval.py reads the same."""
    if seq_len < 1 or max_rows < 1:
        raise UserError(f"asked for at most {max_rows} validation rows of seq_len {seq_len}: both must be at least 1 "
                        f"(ask for at least one row's worth of tokens)")
    meta, shards, fix = _split_shards(data_dir, "val")
    first = np.cumsum([0] + [max(0, (s["tokens"] - 1) // seq_len) for s in shards])
    n_rows = min(max_rows, int(first[-1]))
    if n_rows < 1:
        raise UserError(f"the val split of {data_dir} (largest shard {max(s['tokens'] for s in shards):,} tokens) is "
                        f"shorter than one row of {seq_len + 1} tokens: prepare the data again, into another "
                        f"--out_dir, with a larger --val_tokens")
    picks = np.arange(n_rows, dtype=np.int64) * int(first[-1]) // n_rows  # evenly spread, the first window first
    rows = np.empty((n_rows, seq_len + 1), np.int64)
    for i, shard in enumerate(shards):
        mine = np.flatnonzero((picks >= first[i]) & (picks < first[i + 1]))
        if len(mine):
            path = Path(data_dir) / shard["file"]
            tokens = read_shard(path)[:(first[i + 1] - first[i]) * seq_len + 1]
            _check_ids(tokens, path, 0, meta["vocab_size"], fix)
            starts = (picks[mine] - first[i]) * seq_len
            rows[mine] = tokens[starts[:, None] + np.arange(seq_len + 1)]
    import torch  # as in next_rows
    return torch.from_numpy(rows)


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
