"""
Corpus preparation: text corpora -> the token shards and meta.json of a data folder, which data.py reads for training.

    python prepare.py --source books --tokenizer bytes --out_dir data/books_bytes
    python prepare.py --source dclm --tokenizer llama3:tokenizer.model --out_dir data/dclm --max_tokens 105e9

`python prepare.py --help` lists the sources and tokenizers. The first documents (at least --val_tokens tokens) become
the val split, the rest the train shards (data.py's docstring has their format); re-running the same command resumes
an interrupted or extended preparation. Every document is preceded by the tokenizer's document prefix: end-of-text,
then BOS where the tokenizer has one.

A folder has one preparation at a time (it holds OUT_DIR/prepare.lock). SIGTERM, SIGHUP, Ctrl-C or a full disk stop
it, and its tokenizer processes, leaving whole shards only. meta.json (format 2) records the corpus read: {"documents",
"bytes" (UTF-8), "sha256" (of their text end to end)}; a folder of format 1, which did not, is prepared again.
"""

import argparse
import bz2
import collections
import concurrent.futures
import contextlib
import ctypes
import errno
import fcntl
import glob
import gzip
import hashlib
import itertools
import json
import logging
import lzma
import os
import re
import signal
import socket
import sys
import sysconfig
import threading
import time
from pathlib import Path

import numpy as np

import cli
import data
from cli import UserError

# -----------------------------------------------------------------------------
# Sources: each is an iterator over documents (str), checked when it is opened, before any document is read

HF_NAMED = {"dclm": "mlfoundations/dclm-baseline-1.0", "fineweb-edu": "HuggingFaceFW/fineweb-edu"}
BOOKS = Path(__file__).with_name("corpus") / "books.jsonl.xz"  # in the repository: see corpus/README.md
SOURCE_HELP = ("a SOURCE is books, stdlib, dclm, fineweb-edu[:CONFIG], hf:NAME[:CONFIG], a glob of local files, "
               "or a mix W*SOURCE,W*SOURCE,...")
WEIGHTED = re.compile(r"^(\d+\.?\d*|\.\d+)\*(.+)$")
COMPRESSED = r"\.(gz|xz|bz2|zst|zstd)$"


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
    if spec == "books":  # read here, not through datasets: the quick start needs nothing but the standard library
        return (json.loads(line)["text"] for line in lzma.open(BOOKS, "rt", encoding="utf-8"))
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
    name = re.sub(COMPRESSED, "", path.lower())
    return "json" if name.endswith((".jsonl", ".json")) else "parquet" if name.endswith(".parquet") else "text"


def _stdlib_documents():
    root = sysconfig.get_paths()["stdlib"]
    files = []
    for folder, subfolders, names in os.walk(root):
        subfolders[:] = [s for s in subfolders if s not in ("site-packages", "dist-packages")]
        files += [os.path.relpath(os.path.join(folder, n), root) for n in names if n.endswith(".py")]
    # shuffled by a hash of the path, so that the first files, the val split, are a fair sample, not private modules
    files.sort(key=lambda f: hashlib.sha1(f.replace(os.sep, "/").encode()).hexdigest())
    return (Path(root, f).read_text("utf-8", errors="replace") for f in files)


def _hf_documents(spec, path, config, files, text_field):
    import datasets  # here, not at the top: it takes a second to import and only these sources need it

    def rows(file):
        try:
            return datasets.load_dataset(path, config, data_files=file and [file], split="train", streaming=True)
        except OSError as e:  # not on the hub, no network, no such config: datasets' messages name the cause
            if file:
                raise  # named below
            raise UserError(f"source {spec!r} could not be opened: {e}") from e

    hub = None if files else rows(None)  # opened, and so checked, now
    # local files one at a time, so that a damaged one is named: by our message, which replaces datasets' log line
    logging.getLogger("datasets.packaged_modules").setLevel(logging.CRITICAL if files else logging.NOTSET)

    def documents():
        for file in files or [None]:
            try:
                for row in rows(file) if file else hub:
                    if text_field not in row:
                        raise UserError(f"source {spec!r} has no column {text_field!r} (its columns: {sorted(row)}): "
                                        f"pass --text_field")
                    text = row[text_field]
                    # checked here: a column of another type would fail inside a tokenizer process, far from its cause
                    if text is not None and not isinstance(text, str):
                        raise UserError(f"source {spec!r}: column {text_field!r} holds {type(text).__name__}, not "
                                        f"text: pass the text column as --text_field")
                    yield text or ""
            except (ValueError, EOFError, OSError) as e:  # pyarrow's and the codecs' errors are ValueErrors
                if file is None:
                    raise
                raise UserError(_damaged(file, e)) from None
    return documents()


def _damaged(file, error):
    """One line for a local dataset file that cannot be read: the file, its first bad line (JSON lines), the fix."""
    opener = {".gz": gzip.open, ".xz": lzma.open, ".bz2": bz2.open, ".jsonl": open}.get(Path(file.lower()).suffix)
    if opener and re.sub(COMPRESSED, "", file.lower()).endswith(".jsonl"):
        # a compressed file damaged itself is named below, with its error
        with contextlib.suppress(OSError, EOFError, lzma.LZMAError), opener(file, "rb") as f:
            for n, line in enumerate(f, 1):
                try:
                    json.loads(line.decode("utf-8")) if line.strip() else None
                except ValueError as e:  # UnicodeDecodeError is one
                    what = "not UTF-8" if isinstance(e, UnicodeDecodeError) else "not a whole JSON object"
                    return (f"{file}, line {n}: {what} ({e}): repair or delete that line (a download cut short ends "
                            f"in a cut line), then re-run the same command")
    return (f"{file} cannot be read ({type(error).__name__}: {error}): it is damaged, or not what its name says; "
            f"repair or replace it, then re-run the same command")


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
# Preparation

BATCH_CHARS = 1 << 20  # text per tokenizer task: big enough to amortise the inter-process copy
LOCK = "prepare.lock"  # in the folder while a preparation runs
STOP_SIGNALS = (signal.SIGTERM, signal.SIGHUP)


class Stopped(SystemExit):
    """SIGTERM or SIGHUP, raised as Ctrl-C raises KeyboardInterrupt, so that the preparation unwinds; exit 128 + it."""


def prepare(source, tokenizer, out_dir, *, val_tokens=1_000_000, shard_tokens=100_000_000, max_tokens=None,
            text_field="text", dtype=None, num_proc=None, wait=False):
    """Tokenize SOURCE into shards in OUT_DIR (see the module docstring); returns meta.json's contents."""
    for name, value, least in (("val_tokens", val_tokens, 0), ("shard_tokens", shard_tokens, 1),
                               ("max_tokens", max_tokens, 1), ("num_proc", num_proc, 1)):
        if value is not None and value < least:
            raise UserError(f"--{name} {value}: it must be at least {least}")
    tok = data.get_tokenizer(tokenizer)
    dtype = dtype or ("uint16" if tok.n_vocab <= 1 << 16 else "uint32")
    if dtype not in data.DTYPES:
        raise UserError(f"--dtype {dtype}: shards hold uint16 or uint32 tokens")
    if tok.n_vocab - 1 > np.iinfo(data.DTYPES[dtype]).max:
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
    try:
        with _only_preparation_of(out_dir, wait), _stop_on_signals():
            meta = _prepare(all_documents, tok, out_dir, settings, max_tokens, num_proc or os.cpu_count())
            if meta["train_tokens"] == 0:
                # nothing is left behind (meta.json comes with the first train shard): the retry may use other settings
                for shard in meta["shards"]:
                    (out_dir / shard["file"]).unlink()
    except OSError as e:
        if e.errno not in (errno.ENOSPC, errno.EDQUOT):
            raise
        raise UserError(f"{out_dir}: the disk is full ({e.strerror}): make room there, then re-run the same command, "
                        f"which resumes after the last whole shard") from None
    except Stopped as e:
        print(f"{out_dir}: stopped by {signal.Signals(e.code - 128).name}, leaving whole shards only: re-run the same "
              f"command to resume after the last one", file=sys.stderr)
        raise
    if meta["train_tokens"] == 0:
        if not any(out_dir.iterdir()):
            out_dir.rmdir()
        raise UserError(f"source {source!r} gave {meta['docs']:,} documents and {meta['val_tokens']:,} tokens, "
                        f"none left for training after the {val_tokens:,} validation tokens: give more data or a "
                        f"smaller --val_tokens")
    return meta


def _prepare(all_documents, tok, out_dir, settings, max_tokens, num_proc):
    meta = _resume(out_dir, settings)
    if meta["done"] and (meta["exhausted"] or max_tokens is not None and meta["train_tokens"] >= max_tokens):
        print(f"{out_dir}: already prepared: {meta['train_tokens']:,} train and {meta['val_tokens']:,} val tokens")
        return meta
    t0 = shown = time.time()
    tty = sys.stdout.isatty()  # a terminal: one progress line, redrawn each second after "\r"; a log: a line a minute
    before = meta["train_tokens"] + meta["val_tokens"]
    meta.update(format=data.FORMAT, done=False, max_tokens=max_tokens)
    meta.pop("corpus", None)  # recorded once the preparation is done
    corpus, documents = _Corpus(), iter(all_documents)
    for text in itertools.islice(documents, meta["docs"]):  # those in the shards already: read for the fingerprint
        corpus.add(text)
    val_tokens, shard_tokens = settings["val_target"], settings["shard_tokens"]
    split = "val" if meta["val_tokens"] < val_tokens else "train"
    shard, shard_len, exhausted = [], 0, True
    try:
        with contextlib.closing(_encode(_batches(documents), tok, settings["dtype"], num_proc)) as encoded:
            for text, tokens in encoded:
                corpus.add(text)
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
                if time.time() - shown > (1 if tty else 60):
                    shown, done = time.time(), f" ({meta['train_tokens'] / max_tokens:.0%})" if max_tokens else ""
                    rate = (meta["train_tokens"] + meta["val_tokens"] - before) / (shown - t0)
                    print("\r" * tty + f"{out_dir}: {meta['docs']:,} documents, {meta['val_tokens']:,} val + "
                          f"{meta['train_tokens']:,} train tokens{done}, {rate:,.0f} tokens/s",
                          end="" if tty else "\n", flush=True)
        if shard_len:
            _finish_shard(out_dir, meta, split, shard)
    finally:
        if tty and shown > t0:
            print()  # past the progress line
    if meta["train_tokens"] == 0:
        return meta
    meta.update(done=True, exhausted=exhausted, corpus=corpus.record())
    _write_meta(out_dir, meta)
    written = meta["train_tokens"] + meta["val_tokens"] - before
    print(f"{out_dir}: wrote {written:,} tokens in {time.time() - t0:.1f}s; it holds {meta['train_tokens']:,} train "
          f"and {meta['val_tokens']:,} val tokens from {meta['docs']:,} documents in {len(meta['shards'])} shards")
    return meta


class _Corpus:
    """The fingerprint of the documents read: how many, their UTF-8 bytes, the sha256 of their text end to end."""

    def __init__(self):
        self.documents, self.bytes, self.sha256 = 0, 0, hashlib.sha256()

    def add(self, text):
        utf8 = text.encode("utf-8", "surrogatepass")  # a lone surrogate (JSON can hold one) is hashed, not refused
        self.documents, self.bytes = self.documents + 1, self.bytes + len(utf8)
        self.sha256.update(utf8)

    def record(self):
        return {"documents": self.documents, "bytes": self.bytes, "sha256": self.sha256.hexdigest()}


@contextlib.contextmanager
def _only_preparation_of(out_dir, wait):
    """out_dir to this preparation alone: another one of it at the same time is refused rather than racing this one for
    its files. An flock, which the kernel drops when its process ends, however it ends; the file goes with it."""
    path = out_dir / LOCK
    while True:
        f = open(path, "a+")
        try:
            fcntl.flock(f, fcntl.LOCK_EX | (0 if wait else fcntl.LOCK_NB))  # wait: for train.py's runs side by side
        except BlockingIOError:
            f.seek(0)
            holder = f.read().strip()
            f.close()
            raise UserError(f"{out_dir} is being prepared by another process{f' ({holder})' if holder else ''}, "
                            f"which holds {path}: wait for it to end, or prepare into another --out_dir") from None
        with contextlib.suppress(FileNotFoundError):
            if os.path.samestat(os.fstat(f.fileno()), os.stat(path)):
                break
        f.close()  # its last holder deleted it as this one opened it: lock the file there now
    f.truncate(0)
    f.write(f"pid {os.getpid()} on {socket.gethostname()}\n")
    f.flush()
    try:
        yield
    finally:
        path.unlink(missing_ok=True)
        f.close()


@contextlib.contextmanager
def _stop_on_signals():
    """Within: SIGTERM or SIGHUP raises Stopped (once), where its default would end this process at once and leave its
    tokenizer processes waiting forever; a caller's own handlers, or a thread other than the main one, keep theirs."""
    def stop(signum, frame):
        for s in ours:
            signal.signal(s, signal.SIG_IGN)
        raise Stopped(128 + signum)
    main = threading.current_thread() is threading.main_thread()
    ours = [s for s in STOP_SIGNALS if main and signal.getsignal(s) == signal.SIG_DFL]
    for s in ours:
        signal.signal(s, stop)
    try:
        yield
    finally:
        for s in ours:
            signal.signal(s, signal.SIG_DFL)


def _resume(out_dir, settings):
    """meta.json of an earlier run into out_dir, cut back to its intact shards; a fresh one if there is none."""
    path = out_dir / "meta.json"
    if not path.exists():
        return {"version": data.VERSION, "format": data.FORMAT, **settings, "docs": 0, "train_tokens": 0,
                "val_tokens": 0, "shards": [], "done": False, "exhausted": False}
    meta = data.read_meta(path)
    if meta.get("format", 1) < data.FORMAT:  # it did not record the corpus it read: prepare the folder again
        print(f"{out_dir} was prepared by an older prepare.py (format 1): preparing it again")
        for name in [shard["file"] for shard in meta["shards"]] + ["meta.json"]:
            (out_dir / name).unlink(missing_ok=True)
        return _resume(out_dir, settings)
    changed = {k: (meta.get(k), v) for k, v in settings.items() if meta.get(k) != v}
    if changed:
        raise UserError(f"{out_dir} holds data prepared with other settings {changed} (there, here; val_target is "
                        f"--val_tokens): use another --out_dir or delete that folder. It was made by "
                        f"{data.prepare_command(meta, out_dir)}")
    for i, shard in enumerate(meta["shards"]):
        try:
            ok = len(data.read_shard(out_dir / shard["file"])) == shard["tokens"]
        except (OSError, UserError):
            ok = False
        if not ok:
            print(f"{out_dir / shard['file']} is missing or broken: preparing again from there")
            meta["shards"], meta["done"] = meta["shards"][:i], False
            break
    meta["docs"] = meta["shards"][-1]["docs_end"] if meta["shards"] else 0
    for split in data.SPLITS:
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
    """(text, token array) of each document, in order, tokenized by num_proc processes."""
    # concurrent.futures, not multiprocessing.Pool, which can hang: leaving a Pool early (--max_tokens) may kill a
    # worker as the pool's thread sends it a long task, and a Pool waits forever for the task of a worker that died;
    # the executor fails those. The workers get the tokenizer built and checked here, so that none fails to start.
    with concurrent.futures.ProcessPoolExecutor(num_proc, initializer=_start_worker,
                                                initargs=(tok, data.DTYPES[dtype], os.getpid())) as pool:
        pending = collections.deque()  # bounded, rather than pool.map, which would read a streamed corpus far ahead
        try:
            for batch in batches:
                pending.append((batch, pool.submit(_encode_batch, batch)))
                if len(pending) > 2 * num_proc:
                    batch, task = pending.popleft()
                    yield from zip(batch, task.result())
            while pending:
                batch, task = pending.popleft()
                yield from zip(batch, task.result())
        except concurrent.futures.process.BrokenProcessPool:
            raise UserError("a tokenizer process died (the system kills the largest processes when memory runs "
                            "out): re-run the same command, which resumes after the last shard written, with a "
                            "smaller --num_proc if memory is short") from None
        finally:
            for _, task in pending:
                task.cancel()  # those not sent to a worker yet


def _start_worker(tok, dtype, parent):
    global _worker
    _worker = tok, dtype
    # Stopping is the parent's: on Ctrl-C (sent to the whole process group) or SIGTERM it unwinds and sends the pool
    # away; should it die at once (SIGKILL, OOM), these die with it (PR_SET_PDEATHSIG) rather than wait forever.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    for s in STOP_SIGNALS:
        signal.signal(s, signal.SIG_DFL)
    with contextlib.suppress(AttributeError, OSError):  # not Linux
        ctypes.CDLL(None).prctl(1, signal.SIGKILL)  # 1: PR_SET_PDEATHSIG
    if os.getppid() != parent:  # it died before that
        os._exit(1)


def _encode_batch(texts):
    tok, dtype = _worker
    return [np.array(tok.document_prefix + tok.encode(text), dtype) if text else np.empty(0, dtype) for text in texts]


def _finish_shard(out_dir, meta, split, tokens):
    name = f"{split}_{sum(s['split'] == split for s in meta['shards']):06d}.bin"
    tokens = np.concatenate(tokens)
    data.write_shard(out_dir / name, tokens, meta["dtype"])
    # its largest id, so that a model too small for the data is refused at start-up without reading the shards again
    meta["shards"].append({"file": name, "split": split, "tokens": len(tokens), "docs_end": meta["docs"],
                           "max_id": int(tokens.max(initial=0))})
    # no meta.json before the first train shard: a preparation that fails sooner (a source too small for
    # --val_tokens, an interruption) leaves a folder that a re-run with any settings starts afresh
    if split == "train":
        _write_meta(out_dir, meta)


def _write_meta(out_dir, meta):
    tmp = out_dir / "meta.json.tmp"
    try:
        with open(tmp, "w") as f:
            f.write(json.dumps(meta, indent=1))
        os.replace(tmp, out_dir / "meta.json")
    except BaseException:  # a full disk, a signal: nothing half written stays behind
        tmp.unlink(missing_ok=True)
        raise


def count(text):
    """A whole number of tokens, written 105e9 if need be (an argparse type)."""
    value = float(text)
    if not value.is_integer():  # also inf and nan; argparse reports the ValueError as "invalid count value"
        raise ValueError(text)
    return int(value)


def main(argv):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--source", required=True, help=(
        "books (29 public-domain books in corpus/, offline), stdlib (this Python's standard library, offline, not the "
        "same in every Python), dclm, fineweb-edu[:CONFIG] (e.g. sample-10BT), hf:NAME[:CONFIG] (a Hugging Face "
        "dataset's train split, streamed), a glob of local files in quotes (*.jsonl, *.json, *.parquet, optionally "
        ".gz/.xz/.bz2/.zst, read through datasets; any other file is one document) or a mix by weight of characters, "
        "W*SOURCE,W*SOURCE,..."))
    parser.add_argument("--tokenizer", required=True, help=(
        "bytes (offline), a tiktoken encoding: gpt2, cl100k_base, o200k_base (downloaded once into "
        "$TIKTOKEN_CACHE_DIR), or llama3:PATH (Llama 3's original tokenizer.model)"))
    parser.add_argument("--out_dir", required=True)
    parser.add_argument("--val_tokens", type=count, default=1_000_000, help="held out, from the first documents")
    parser.add_argument("--shard_tokens", type=count, default=100_000_000)
    parser.add_argument("--max_tokens", type=count, default=None, help="stop after this many train tokens")
    parser.add_argument("--text_field", default="text", help="the text column of dataset sources")
    parser.add_argument("--dtype", choices=list(data.DTYPES), help="default: uint16 if the vocabulary fits")
    parser.add_argument("--num_proc", type=int, default=None, help="tokenizer processes (default: all cores)")
    args = parser.parse_args(argv)
    prepare(args.source, args.tokenizer, args.out_dir, val_tokens=args.val_tokens, shard_tokens=args.shard_tokens,
            max_tokens=args.max_tokens, text_field=args.text_field, dtype=args.dtype, num_proc=args.num_proc)


if __name__ == "__main__":
    cli.run(main)
