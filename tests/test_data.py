"""prepare.py and data.py: text -> shards -> rows, for both TST phases, under DDP and across resumes, signals and full
disks; and every bad input."""

import base64
import contextlib
import errno
import faulthandler
import fcntl
import gzip
import hashlib
import itertools
import json
import lzma
import multiprocessing
import os
import random
import re
import shlex
import signal
import subprocess
import sys
import threading
import time
import types
from pathlib import Path

import numpy as np
import pytest
import torch

import data
import prepare
from data import UserError

ROOT = Path(__file__).resolve().parents[1]
EOT_TEXT = "<|endoftext|>"


def make_docs(n, seed=0):
    rng = random.Random(seed)
    words = ["token", "bag", "superposition", "héllo", "日本語", "x<|endoftext|>y", "\n", "42", "\t"]
    return [" ".join(rng.choice(words) for _ in range(rng.randint(5, 60))) for _ in range(n)]


def write_docs(folder, docs, suffix=".txt"):
    folder.mkdir(parents=True, exist_ok=True)
    for i, doc in enumerate(docs):
        (folder / f"doc_{i:04d}{suffix}").write_text(doc, encoding="utf-8")
    return str(folder / f"*{suffix}")


def split_stream(out_dir, split):
    meta = json.loads((out_dir / "meta.json").read_text())
    return np.concatenate([data.read_shard(out_dir / s["file"]) for s in meta["shards"] if s["split"] == split])


def expected_tokens(tok, docs):  # tokenizers without BOS: end-of-text before every document
    return np.array([t for d in docs for t in [tok.eot] + tok.encode(d)], dtype=np.int64)


# -----------------------------------------------------------------------------
# Tokenizers


def test_bytes_tokenizer_is_utf8_with_end_of_text_256():
    tok = data.get_tokenizer("bytes")
    text = "héllo 日本 <|endoftext|>\n"
    assert (tok.n_vocab, tok.eot, tok.bos) == (257, 256, None)
    assert tok.encode(text) == list(text.encode("utf-8"))  # the special string is ordinary text
    assert tok.decode(tok.encode(text)) == text
    assert tok.decode([104, 256, 105]) == "h" + EOT_TEXT + "i"


def write_ranks(path, tokens):
    path.write_text("".join(f"{base64.b64encode(t).decode()} {rank}\n" for rank, t in enumerate(tokens)))
    return f"llama3:{path}"


def test_llama3_format_tokenizer_on_a_tiny_hand_made_file(tmp_path):
    merges = [b"he", b"ll", b"llo", b"hello", b" w", b"or", b" wor", b"ld", b" world", b"12"]
    name = write_ranks(tmp_path / "tokenizer.model", [bytes([b]) for b in range(256)] + merges)
    tok = data.get_tokenizer(name)
    n = 256 + len(merges)  # the special tokens are numbered after the ranks, as Llama 3's 128,000 + 256
    assert (tok.n_vocab, tok.bos, tok.eot) == (n + 256, n, n + 1)
    assert tok.decode([n, n + 1, n + 9, n + 255]) == ("<|begin_of_text|><|end_of_text|><|eot_id|>"
                                                      "<|reserved_special_token_250|>")
    assert tok.encode("hello world") == [259, 264]  # BPE merges by rank
    # Llama 3's pattern cuts digits in groups of three ("121", "2"), so "12" can merge only once
    assert tok.encode("1212") == [265, ord("1"), ord("2")]
    text = "Hello <|end_of_text|> wörld\n\n  12345"
    ids = tok.encode(text)
    assert max(ids) < n and tok.decode(ids) == text


def test_real_tokenizers_from_the_offline_assets(shared_data, monkeypatch):
    monkeypatch.setenv("TIKTOKEN_CACHE_DIR", str(shared_data / "tiktoken_cache"))
    expected = {"gpt2": ([15496, 995], 50256, 50257), "cl100k_base": ([9906, 1917], 100257, 100277),
                "o200k_base": ([13225, 2375], 199999, 200019)}
    for name, (ids, eot, n_vocab) in expected.items():
        tok = data.get_tokenizer(name)
        assert (tok.encode("Hello world"), tok.eot, tok.n_vocab, tok.bos) == (ids, eot, n_vocab, None)
    llama = data.get_tokenizer(f"llama3:{shared_data / 'llama3' / 'tokenizer.model'}")
    assert (llama.n_vocab, llama.bos, llama.eot, llama.encode("Hello world")) == (128256, 128000, 128001, [9906, 1917])
    # meta.json's vocab_size, eot and bos are checked against these where they load offline
    names = ["gpt2", "o200k_base", f"llama3:{shared_data / 'llama3' / 'tokenizer.model'}"]
    assert [tuple(data.known_ids(name).values()) for name in names] == [(50257, 50256, None), (200019, 199999, None),
                                                                         (128256, 128001, 128000)]


def test_a_tokenizers_ids_are_known_where_that_is_cheap_and_needs_no_network(tmp_path, monkeypatch):
    assert data.known_ids("bytes") == {"vocab_size": 257, "eot": 256, "bos": None}
    name = write_ranks(tmp_path / "tokenizer.model", [bytes([b]) for b in range(256)] + [b"he"])
    tok = data.get_tokenizer(name)
    assert data.known_ids(name) == {"vocab_size": tok.n_vocab, "eot": tok.eot, "bos": tok.bos}
    assert tok.n_vocab == 257 + 256
    assert data.known_ids(f"llama3:{tmp_path / 'not_on_this_machine.model'}") is None
    assert data.known_ids("none") is None  # a folder made by hand

    import requests  # what tiktoken downloads with

    def download(*args, **kw):
        raise AssertionError("a download was tried")
    monkeypatch.setattr(requests, "get", download)
    monkeypatch.setenv("TIKTOKEN_CACHE_DIR", str(tmp_path / "empty_cache"))
    monkeypatch.setattr(data.tiktoken.registry, "ENCODINGS", {})  # none loaded yet in this process
    # known without the encoding's file: a folder's meta.json is checked even where tiktoken's cache is empty
    assert data.known_ids("cl100k_base") == {"vocab_size": 100277, "eot": 100257, "bos": None}


def test_the_tiktoken_ids_known_without_their_files_are_tiktokens(shared_data, monkeypatch):
    monkeypatch.setenv("TIKTOKEN_CACHE_DIR", str(shared_data / "tiktoken_cache"))
    for name, (n_vocab, eot) in data.TIKTOKEN_IDS.items():
        enc = data.tiktoken.get_encoding(name)
        assert (enc.n_vocab, enc.eot_token) == (n_vocab, eot), name


def test_a_vocabulary_over_uint16_gets_uint32_shards(shared_data, monkeypatch, tmp_path):
    monkeypatch.setenv("TIKTOKEN_CACHE_DIR", str(shared_data / "tiktoken_cache"))
    docs = ["Hello world", "the end"]
    meta = prepare.prepare(write_docs(tmp_path / "docs", docs), "cl100k_base", tmp_path / "out", val_tokens=0,
                           num_proc=1)
    assert meta["dtype"] == "uint32"
    tokens = split_stream(tmp_path / "out", "train")
    assert tokens.dtype == np.uint32 and list(tokens) == list(expected_tokens(data.get_tokenizer("cl100k_base"), docs))


# -----------------------------------------------------------------------------
# Preparation


def test_round_trip_text_to_shards_to_rows_to_text(tmp_path):
    docs = make_docs(300)
    tok = data.get_tokenizer("bytes")
    meta = prepare.prepare(write_docs(tmp_path / "docs", docs), "bytes", tmp_path / "out", val_tokens=2000,
                        shard_tokens=5000, num_proc=2)
    n_val = next(i for i in range(len(docs) + 1) if len(expected_tokens(tok, docs[:i])) >= 2000)
    val, train = split_stream(tmp_path / "out", "val"), split_stream(tmp_path / "out", "train")
    # the first documents, until there are val_tokens, are held out; every document follows an end-of-text
    assert np.array_equal(val, expected_tokens(tok, docs[:n_val]))
    assert np.array_equal(train, expected_tokens(tok, docs[n_val:]))
    assert (train == tok.eot).sum() == len(docs) - n_val  # the quoted "<|endoftext|>" stayed text
    assert tok.decode(train) == "".join(EOT_TEXT + d for d in docs[n_val:])
    assert {k: meta[k] for k in ("tokenizer", "vocab_size", "dtype", "train_tokens", "val_tokens")} == \
        {"tokenizer": "bytes", "vocab_size": 257, "dtype": "uint16", "train_tokens": len(train), "val_tokens": len(val)}
    assert len([s for s in meta["shards"] if s["split"] == "train"]) == -(-len(train) // 5000)  # cut at documents
    # each shard's largest id, so that train.py can check the model's vocabulary without reading the shards
    assert [s["max_id"] for s in meta["shards"]] == [data.read_shard(tmp_path / "out" / s["file"]).max()
                                                     for s in meta["shards"]]

    # rows of both phases' lengths are stretches of the prepared text, its document prefixes included
    prepare.prepare(write_docs(tmp_path / "docs", docs), "bytes", tmp_path / "one", val_tokens=2000, num_proc=2)
    s, T = 6, 16
    loader = data.TokenLoader(tmp_path / "one", "train", 4, window=s * T)
    text = data.read_shard(tmp_path / "one" / "train_000000.bin").tolist()  # the one train shard
    for L in [s * T] * 3 + [T] * 3:
        rows = loader.next_rows(L)
        assert rows.shape == (4, L + 1) and rows.dtype == torch.int64
        for row in rows.tolist():
            # a piece of a window: found in the text at a multiple of the row length
            assert any(text[i:i + L + 1] == row for i in range(0, len(text) - L, L))


@pytest.mark.parametrize("tty", [False, True])
def test_progress_is_whole_lines_in_a_log_and_one_redrawn_line_on_a_terminal(tmp_path, capsys, monkeypatch, tty):
    monkeypatch.setattr(sys.stdout, "isatty", lambda: tty, raising=False)
    monkeypatch.setattr(prepare, "time", types.SimpleNamespace(time=itertools.count(0, 100).__next__))  # 100 s a read
    prepare.prepare(write_docs(tmp_path / "docs", make_docs(20)), "bytes", tmp_path / "out", val_tokens=200,
                    num_proc=1)
    out = capsys.readouterr().out
    progress = [line for line in out.split("\n") if " documents, " in line]
    assert len(progress) == (1 if tty else 20)  # a log: one line per update (each after 100 s), each its own line
    assert ("\r" in out) == tty and progress[0].count("\r") == (20 if tty else 0)


def test_the_books_are_the_corpus_their_readme_lists_and_prepare_alike_everywhere(tmp_path):
    readme = (ROOT / "corpus" / "README.md").read_text()
    listed = re.findall(r"^\| \d+ \| (val|train) \| .* \| ([\d,]+) \| .* \| `([0-9a-f]{16})` \|$", readme, re.M)
    texts = [json.loads(line)["text"].encode() for line in lzma.open(prepare.BOOKS, "rt", encoding="utf-8")]
    assert len(listed) == len(texts) == 29
    for (split, size, sha256), text in zip(listed, texts):
        assert int(size.replace(",", "")) == len(text) and hashlib.sha256(text).hexdigest().startswith(sha256)
    meta = prepare.prepare("books", "bytes", tmp_path / "books", num_proc=1)
    corpus = meta["corpus"]
    assert f"{corpus['documents']} documents, {corpus['bytes']:,} bytes, sha256 {corpus['sha256']}" in readme
    assert corpus["sha256"] == hashlib.sha256(b"".join(texts)).hexdigest()
    # the val split is the books the README says, whole: each after its end-of-text byte
    val = [text for (split, _, _), text in zip(listed, texts) if split == "val"]
    assert split_stream(tmp_path / "books", "val").tolist() == [x for t in val for x in [256, *t]]
    assert meta["train_tokens"] == sum(len(t) + 1 for t in texts) - meta["val_tokens"]


def test_a_folder_of_format_1_is_prepared_again(tmp_path):
    source = write_docs(tmp_path / "docs", make_docs(40, seed=3))
    kw = dict(val_tokens=500, shard_tokens=1000, num_proc=1)
    reference = prepare.prepare(source, "bytes", tmp_path / "out", **kw)
    # as an older prepare.py left it: no format, no corpus, and a shard that this one does not write
    old = {k: v for k, v in reference.items() if k not in ("format", "corpus")}
    old["shards"] = old["shards"] + [{**old["shards"][-1], "file": "train_000099.bin"}]
    (tmp_path / "out" / "train_000099.bin").write_bytes((tmp_path / "out" / old["shards"][-2]["file"]).read_bytes())
    (tmp_path / "out" / "meta.json").write_text(json.dumps(old))
    assert prepare.prepare(source, "bytes", tmp_path / "out", **kw) == reference
    assert not (tmp_path / "out" / "train_000099.bin").exists()


def test_stdlib_is_the_offline_default_corpus(tmp_path):
    metas = [prepare.prepare("stdlib", "bytes", tmp_path / d, val_tokens=20_000, max_tokens=50_000) for d in "ab"]
    assert metas[0]["vocab_size"] == 257 and metas[0]["train_tokens"] >= 50_000 and not metas[0]["exhausted"]
    for split in data.SPLITS:  # a fixed order of files, so every machine with this Python gets the same data
        assert np.array_equal(split_stream(tmp_path / "a", split), split_stream(tmp_path / "b", split))
    assert "import " in data.get_tokenizer("bytes").decode(split_stream(tmp_path / "a", "val"))


@pytest.mark.parametrize("kind", ["jsonl", "parquet"])
def test_datasets_path_reads_local_jsonl_and_parquet(tmp_path, kind):
    docs = make_docs(20, seed=1)
    rows = [{"id": i, "content": d} for i, d in enumerate(docs)]
    if kind == "jsonl":  # read through datasets.load_dataset("json", data_files=...)
        (tmp_path / "a.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows[:12]))
        (tmp_path / "b.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows[12:]))
    else:
        import pyarrow as pa
        import pyarrow.parquet as pq
        pq.write_table(pa.Table.from_pylist(rows), tmp_path / "a.parquet")
    source = str(tmp_path / f"*.{kind}")
    prepare.prepare(source, "bytes", tmp_path / "out", val_tokens=0, text_field="content", num_proc=1)
    assert np.array_equal(split_stream(tmp_path / "out", "train"), expected_tokens(data.get_tokenizer("bytes"), docs))
    with pytest.raises(UserError, match="no column 'text'.*content"):
        prepare.prepare(source, "bytes", tmp_path / "out2", num_proc=1)
    # found while reading, not inside a tokenizer process, where it would fail far from its cause
    with pytest.raises(UserError, match="column 'id' holds int, not text"):
        prepare.prepare(source, "bytes", tmp_path / "out3", text_field="id", num_proc=2)


def test_a_mix_follows_its_weights_and_stops_when_a_source_runs_out(tmp_path, capsys):
    a_docs = [f"a{i}".ljust(29, "a") for i in range(4)]  # 30 characters a document, with its separator
    b_docs = [f"b{i}".ljust(9, "b") for i in range(100)]  # 10
    source = f"3*{write_docs(tmp_path / 'a', a_docs)},1*{write_docs(tmp_path / 'b', b_docs)}"
    prepare.prepare(source, "bytes", tmp_path / "out", val_tokens=0, num_proc=1)
    out = data.get_tokenizer("bytes").decode(split_stream(tmp_path / "out", "train")).split(EOT_TEXT)[1:]
    assert [d for d in out if d[0] == "a"] == a_docs  # each source in its own order, all of the scarce one
    assert [d for d in out if d[0] == "b"] == b_docs[:len(out) - 4]
    share = [0, 0]
    for d in out:  # by characters, a mix never strays from its weights by more than one document
        share[d[0] == "b"] += (len(d) + 1) / (3 if d[0] == "a" else 1)
        assert abs(share[0] - share[1]) <= 10
    assert len(out) < 20 and "ran out" in capsys.readouterr().out


def prepare_until_a_power_cut(monkeypatch, n_docs, *args, **kw):
    """prepare.prepare(*args, **kw), stopped by an exception when it asks for document n_docs."""
    real = prepare._documents

    def power_cut(*source):
        for i, doc in enumerate(real(*source)):
            if i == n_docs:
                raise RuntimeError("power cut")
            yield doc
    with monkeypatch.context() as m:
        m.setattr(prepare, "_documents", power_cut)
        with pytest.raises(RuntimeError, match="power cut"):
            prepare.prepare(*args, **kw)


def test_an_interrupted_or_damaged_preparation_resumes_to_the_same_shards(tmp_path, monkeypatch):
    monkeypatch.setattr(prepare, "BATCH_CHARS", 300)  # many small tokenizer tasks
    source = write_docs(tmp_path / "docs", make_docs(120, seed=2))
    kw = dict(val_tokens=1000, shard_tokens=2000, num_proc=2)
    reference = prepare.prepare(source, "bytes", tmp_path / "ref", **kw)

    prepare_until_a_power_cut(monkeypatch, 90, source, "bytes", tmp_path / "out", **kw)
    partial = json.loads((tmp_path / "out" / "meta.json").read_text())
    assert not partial["done"] and 2 <= len(partial["shards"]) < len(reference["shards"])
    with pytest.raises(UserError, match="only partly prepared.*python prepare.py --source .* --val_tokens 1000 "
                                         "--shard_tokens 2000"):
        data.TokenLoader(tmp_path / "out", "train", 2, window=8)
    finished = {s["file"]: os.stat(tmp_path / "out" / s["file"]).st_mtime_ns for s in partial["shards"]}

    def same_as_reference():
        for s in reference["shards"]:
            assert (tmp_path / "out" / s["file"]).read_bytes() == (tmp_path / "ref" / s["file"]).read_bytes()
        assert json.loads((tmp_path / "out" / "meta.json").read_text()) == reference

    assert prepare.prepare(source, "bytes", tmp_path / "out", **kw) == reference
    same_as_reference()
    assert {f: os.stat(tmp_path / "out" / f).st_mtime_ns for f in finished} == finished  # skipped, not rewritten

    broken = tmp_path / "out" / reference["shards"][3]["file"]
    broken.write_bytes(broken.read_bytes()[:-7])
    with pytest.raises(UserError, match=f"{broken.name} is truncated.*re-run python prepare.py --source"):
        data.TokenLoader(tmp_path / "out", "train", 2, window=8)
    prepare.prepare(source, "bytes", tmp_path / "out", **kw)
    same_as_reference()


def test_a_preparation_that_fails_before_its_first_train_shard_leaves_the_folder_free(tmp_path, monkeypatch):
    source = write_docs(tmp_path / "docs", make_docs(40, seed=5))
    out = tmp_path / "out"
    with pytest.raises(UserError, match="none left for training.*smaller --val_tokens"):
        prepare.prepare(source, "bytes", out, num_proc=1)  # the default 1,000,000 val tokens take every document
    assert not out.exists()
    # cut off while writing the val split, in shards of 300 tokens: no meta.json ties the folder to those settings
    monkeypatch.setattr(prepare, "BATCH_CHARS", 300)  # small tokenizer tasks, so that shards are written before the cut
    prepare_until_a_power_cut(monkeypatch, 20, source, "bytes", out, val_tokens=5000, shard_tokens=300, num_proc=1)
    assert len(list(out.glob("val_*.bin"))) >= 2 and not (out / "meta.json").exists()

    kw = dict(val_tokens=500, shard_tokens=300, num_proc=1)
    meta = prepare.prepare(source, "bytes", out, **kw)
    assert meta == prepare.prepare(source, "bytes", tmp_path / "fresh", **kw)
    for split in data.SPLITS:
        assert np.array_equal(split_stream(out, split), split_stream(tmp_path / "fresh", split))


def test_max_tokens_stops_early_and_a_rerun_extends_the_same_stream(tmp_path):
    source = write_docs(tmp_path / "docs", make_docs(80, seed=3))
    full = prepare.prepare(source, "bytes", tmp_path / "full", val_tokens=500, num_proc=2)
    part = prepare.prepare(source, "bytes", tmp_path / "out", val_tokens=500, max_tokens=1000, num_proc=2)
    assert 1000 <= part["train_tokens"] < full["train_tokens"] and not part["exhausted"]
    assert prepare.prepare(source, "bytes", tmp_path / "out", val_tokens=500, max_tokens=1000, num_proc=2) == part
    prepare.prepare(source, "bytes", tmp_path / "out", val_tokens=500, num_proc=2)
    for split in data.SPLITS:
        assert np.array_equal(split_stream(tmp_path / "out", split), split_stream(tmp_path / "full", split))


STOP_EARLY = """
import faulthandler, sys
sys.path.insert(0, sys.argv[1])
import prepare
sys.setswitchinterval(1e-6)  # threads take turns at almost every bytecode: a race between two of them shows sooner
prepare.BATCH_CHARS = 1 << 17  # a tokenizer task is one document of 128K characters, several pipe buffers long
faulthandler.dump_traceback_later(float(sys.argv[3]), exit=True)  # a hang ends with every thread's stack
for i in range(int(sys.argv[2])):
    prepare.prepare(sys.argv[4], "bytes", f"{sys.argv[5]}/{i}", val_tokens=0, max_tokens=1, num_proc=4)
"""


def test_stopping_early_never_hangs_the_tokenizer_processes(tmp_path):
    # --max_tokens stops while tasks are on their way to the tokenizer processes. Ending a multiprocessing.Pool there
    # (terminate, as `with Pool` does) hung about once in 180 stdlib preparations under load: the pool's thread that
    # sends tasks waited forever on a pipe whose reader had been killed. These 20 runs (four processes on shared
    # cores, large tasks) hung that code in each of 15 tries, within its first 9 runs; they take about 3 seconds now.
    source = write_docs(tmp_path / "docs", ["x" * (1 << 17)] * 12)
    log = tmp_path / "log"
    with open(log, "w") as out:  # a file, not a pipe: the tokenizer processes of a hung run would hold a pipe open
        run = subprocess.Popen([sys.executable, "-c", STOP_EARLY, str(ROOT), "20", "30", source, str(tmp_path / "out")],
                               stdout=out, stderr=out, start_new_session=True)
        try:
            returncode = run.wait(timeout=60)
        finally:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(run.pid, signal.SIGKILL)  # whatever a hung run left behind
    assert returncode == 0, log.read_text()[-4000:]
    assert len(list((tmp_path / "out").iterdir())) == 20


def test_a_tokenizer_process_that_dies_stops_the_preparation_with_one_line_and_a_rerun_resumes(tmp_path, monkeypatch):
    monkeypatch.setattr(prepare, "BATCH_CHARS", 300)  # many small tokenizer tasks
    source = write_docs(tmp_path / "docs", make_docs(200, seed=6))
    kw = dict(val_tokens=500, shard_tokens=2000, num_proc=2)
    reference = prepare.prepare(source, "bytes", tmp_path / "ref", **kw)
    real = prepare._documents

    def out_of_memory(*source):
        for i, doc in enumerate(real(*source)):
            if i == 150:  # as the kernel's OOM killer does; all of them, since one that dies idle while the other
                for worker in multiprocessing.active_children():  # keeps up may go unnoticed (and do no harm)
                    os.kill(worker.pid, signal.SIGKILL)
            yield doc
    faulthandler.dump_traceback_later(60, exit=True)  # where it hangs (a multiprocessing.Pool did), end the tests
    try:
        with monkeypatch.context() as m:
            m.setattr(prepare, "_documents", out_of_memory)
            with pytest.raises(UserError, match="a tokenizer process died .*re-run the same command"):
                prepare.prepare(source, "bytes", tmp_path / "out", **kw)
    finally:
        faulthandler.cancel_dump_traceback_later()
    assert prepare.prepare(source, "bytes", tmp_path / "out", **kw) == reference


def descendants(pid):
    """The processes under pid, from /proc (a process's parent is the 4th field of /proc/PID/stat)."""
    parents = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        with contextlib.suppress(OSError, IndexError):
            parents[int(stat.parent.name)] = int(stat.read_text().rsplit(")", 1)[1].split()[1])
    found, frontier = [], {pid}
    while frontier:
        frontier = {child for child, parent in parents.items() if parent in frontier}
        found += frontier
    return found


def running(pid):
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"  # a zombie has ended
    except OSError:
        return False


def wait_for(condition, seconds, what):
    end = time.monotonic() + seconds
    while not condition():
        assert time.monotonic() < end, what
        time.sleep(0.05)


STALLED = """
import runpy, sys, time
sys.path.insert(0, sys.argv[1])
import cli, prepare
prepare.BATCH_CHARS = 1000  # small tokenizer tasks: several are done, and shards written, before the source stalls
real = prepare._documents

def stalled(*args):  # the corpus, then a source that never sends its next document (a network that hangs)
    yield from real(*args)
    while True:
        time.sleep(1)
prepare._documents = stalled
sys.argv = sys.argv[2:]
if sys.argv[0] == "data.py":  # its alias, as python data.py runs it
    runpy.run_path("data.py", run_name="__main__")
cli.run(prepare.main)
"""


@pytest.mark.parametrize("script, signum", [("prepare.py", signal.SIGTERM), ("data.py", signal.SIGTERM),
                                            ("prepare.py", signal.SIGKILL)])
def test_a_signal_ends_the_preparation_and_its_tokenizer_processes(tmp_path, script, signum):
    # SIGTERM (what a cluster, systemd or docker stop send) ends the tokenizer processes with the preparation and
    # leaves whole shards only; even SIGKILL (the OOM killer's) takes them along. The source stalls after its last
    # document: the preparation is still running, its tokenizer processes started, whenever it is signalled.
    source = write_docs(tmp_path / "docs", make_docs(200, seed=9))
    out, kw = tmp_path / "out", dict(val_tokens=1000, shard_tokens=2000, num_proc=2)
    args = ["--source", source, "--tokenizer", "bytes", "--out_dir", out] + [f"--{k}={v}" for k, v in kw.items()]
    with open(tmp_path / "stderr", "w") as log:  # a file, not a pipe, which processes left behind would hold open
        run = subprocess.Popen([sys.executable, "-c", STALLED, str(ROOT), script, *map(str, args)], cwd=ROOT,
                               stdout=log, stderr=log)
    workers = []
    try:
        wait_for(lambda: (out / "meta.json").exists() and len(descendants(run.pid)) == 2, 20, "no train shard yet")
        workers = descendants(run.pid)
        os.kill(run.pid, signum)
        run.wait(timeout=10)
        wait_for(lambda: not any(map(running, workers)), 5, "tokenizer processes outlived the preparation")
    finally:
        for pid in [run.pid] + workers:  # what a failed run left behind
            if running(pid):
                os.kill(pid, signal.SIGKILL)
    stderr = (tmp_path / "stderr").read_text()
    assert run.returncode == (128 + signum if signum == signal.SIGTERM else -signum), stderr
    if signum == signal.SIGTERM:
        assert "Traceback" not in stderr and "stopped by SIGTERM" in stderr and "re-run" in stderr, stderr
        assert sorted(p.name for p in out.iterdir() if not p.name.endswith(".bin")) == ["meta.json"]
    assert not json.loads((out / "meta.json").read_text())["done"]
    assert prepare.prepare(source, "bytes", out, **kw) == prepare.prepare(source, "bytes", tmp_path / "fresh", **kw)


def test_a_full_disk_is_one_line_and_leaves_no_partial_file(tmp_path, monkeypatch):
    source = write_docs(tmp_path / "docs", make_docs(100, seed=7))
    kw = dict(val_tokens=500, shard_tokens=1000, num_proc=1)
    reference = prepare.prepare(source, "bytes", tmp_path / "ref", **kw)
    real_open = open

    def disk_full_at(suffix, n):
        """An open that fails as a full disk does at the n-th file ending in suffix, after writing part of it."""
        opened = []

        def full(path, mode="r", *args, **kw):
            f = real_open(path, mode, *args, **kw)
            if "w" in mode and str(path).endswith(suffix):
                opened.append(path)
                if len(opened) == n:
                    f.write(b"half" if "b" in mode else "half")
                    f.close()
                    raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
            return f
        return full

    out = tmp_path / "out"
    for module, suffix, n in ((data, ".bin.tmp", 4), (prepare, "meta.json.tmp", 2)):  # a shard, then meta.json
        with monkeypatch.context() as m:
            m.setattr(module, "open", disk_full_at(suffix, n), raising=False)
            with pytest.raises(UserError, match=f"^{re.escape(str(out))}: the disk is full .*re-run the same "
                                                f"command"):
                prepare.prepare(source, "bytes", out, **kw)
        assert not [p for p in out.iterdir() if p.suffix == ".tmp"]
    assert prepare.prepare(source, "bytes", out, **kw) == reference  # space freed: the re-run resumes

    def denied(*args, **kw):
        raise OSError(errno.EACCES, os.strerror(errno.EACCES))
    monkeypatch.setattr(data, "open", denied, raising=False)
    with pytest.raises(PermissionError):  # by its errno, not its text: other errors keep their traceback
        prepare.prepare(source, "bytes", tmp_path / "other", **kw)


def test_a_folder_is_prepared_by_one_preparation_at_a_time(tmp_path):
    source = write_docs(tmp_path / "docs", make_docs(20))
    out = tmp_path / "out"
    out.mkdir()
    with open(out / "prepare.lock", "a+") as held:  # as another preparation of the folder holds it
        fcntl.flock(held, fcntl.LOCK_EX | fcntl.LOCK_NB)
        held.write("pid 4242 on elsewhere\n")
        held.flush()
        with pytest.raises(UserError, match=f"^{re.escape(str(out))} is being prepared by another process \\(pid 4242 "
                                            f"on elsewhere\\).*wait for it to end"):
            prepare.prepare(source, "bytes", out, val_tokens=0, num_proc=1)
        assert list(out.iterdir()) == [out / "prepare.lock"]  # nothing of the refused one
    meta = prepare.prepare(source, "bytes", out, val_tokens=0, num_proc=1)
    assert meta["done"] and not (out / "prepare.lock").exists()  # the lock goes with its preparation
    # train.py's own preparation (two runs started at once on a fresh clone) waits for the other one instead
    other = tmp_path / "other"
    other.mkdir()
    held = open(other / "prepare.lock", "a+")
    fcntl.flock(held, fcntl.LOCK_EX | fcntl.LOCK_NB)

    def finish():  # as the other preparation ends: its lock file goes, then its flock
        time.sleep(0.5)
        (other / "prepare.lock").unlink()
        held.close()
    threading.Thread(target=finish).start()
    start = time.monotonic()
    assert prepare.prepare(source, "bytes", other, val_tokens=0, num_proc=1, wait=True) == meta
    assert time.monotonic() - start >= 0.5 and not (other / "prepare.lock").exists()


@pytest.mark.parametrize("name, content, where", [
    ("cut.jsonl", b'{"text": "one"}\n{"text": "two"}\n{"text": "thr', r"cut.jsonl, line 3: not a whole JSON"),
    ("latin1.jsonl", b'{"text": "one"}\n{"text": "caf\xe9"}\n', r"latin1.jsonl, line 2: not UTF-8"),
    ("cut.jsonl.gz", gzip.compress(b'{"text": "one"}\n{"text": "tw'), r"cut.jsonl.gz, line 2: not a whole JSON"),
])
def test_a_damaged_jsonl_file_is_named_with_its_line(tmp_path, capfd, name, content, where):
    (tmp_path / "docs").mkdir()
    (tmp_path / "docs" / f"a_good{name[name.index('.'):]}").write_bytes(gzip.compress(b'{"text": "fine"}\n')
                                                                        if name.endswith(".gz") else
                                                                        b'{"text": "fine"}\n')
    (tmp_path / "docs" / name).write_bytes(content)
    with pytest.raises(UserError, match=f"{re.escape(str(tmp_path / 'docs'))}/{where}.*repair or delete"):
        prepare.prepare(str(tmp_path / "docs" / "*"), "bytes", tmp_path / "out", val_tokens=0, num_proc=1)
    assert "Failed to load JSON" not in capfd.readouterr().err  # datasets' own message would make a second line


# -----------------------------------------------------------------------------
# The loader, on a folder whose token i is i: every token names its own place in the split, and the separator's ids
# (end-of-text, then BOS where there is one) come after them


def labelled_dir(folder, sizes, split="train", bos=False, record_max=True):
    """A data folder whose split holds tokens 0, 1, 2, ... in shards of `sizes` tokens; record_max=False: as prepared
    before each shard's largest id was recorded in meta.json."""
    folder.mkdir()
    shards, base = [], 0
    for i, n in enumerate(sizes):
        data.write_shard(folder / f"{split}_{i:06d}.bin", np.arange(base, base + n), "uint32")
        shards.append({"file": f"{split}_{i:06d}.bin", "split": split, "tokens": n, "docs_end": 0,
                       **({"max_id": base + n - 1} if record_max else {})})
        base += n
    meta = {"source": "test", "tokenizer": "none", "vocab_size": base + 1 + bos, "dtype": "uint32", "eot": base,
            "bos": base + 1 if bos else None, "text_field": "text", "val_target": base if split == "val" else 0,
            "shard_tokens": max(sizes), "done": True, "shards": shards}
    (folder / "meta.json").write_text(json.dumps(meta))
    return folder


SIZES = [700, 1000, 700]  # 2400 tokens in three shards


def places(rows):
    """Where each row starts in the split, after checking that it is one stretch of consecutive tokens of it."""
    rows = rows.numpy()
    assert (np.diff(rows, axis=1) == 1).all()  # token i is i: a row that joined two places would break the run
    return rows[:, 0]


def windows_of(sizes, window):
    """The split's windows, spelled out: `window` tokens from every multiple of it in each shard, with a next token."""
    bases = np.cumsum([0] + sizes)
    return [b + k * window for b, n in zip(bases, sizes) for k in range((n - 1) // window)]


@pytest.mark.parametrize("n", [1, 2, 3, 4, 5, 17, 64, 1000, 4097])
def test_shuffled_is_a_permutation_fixed_by_its_key(n):
    order = data.shuffled(np.arange(n), n, [7, 0])
    assert sorted(order.tolist()) == list(range(n))
    assert np.array_equal(data.shuffled(np.arange(n)[::-1], n, [7, 0]), order[::-1])  # pointwise, any order asked
    if n >= 17:
        assert not np.array_equal(data.shuffled(np.arange(n), n, [7, 1]), order)  # another epoch, another order
        assert abs(np.corrcoef(np.arange(n), order)[0, 1]) < 0.5  # not a near-identity


@pytest.mark.parametrize("world_size, B", [(1, 4), (2, 2), (4, 5)])
def test_an_epoch_reads_every_window_once_in_a_new_order_each_epoch(tmp_path, world_size, B):
    folder = labelled_dir(tmp_path / "d", SIZES)
    window = 24
    loaders = [data.TokenLoader(folder, "train", B, window=window, seed=5, rank=r, world_size=world_size)
               for r in range(world_size)]
    all_windows = windows_of(SIZES, window)  # 29 + 41 + 29 = 99: a shard's last tokens make no whole window
    assert loaders[0].windows == len(all_windows) == 99
    starts = []
    for _ in range(3 * 99 // (world_size * B) + 1):
        step = [places(loader.next_rows(window)) for loader in loaders]
        assert all(len(rows) == B for rows in step)
        starts += list(np.concatenate(step))  # rank order: rank r holds rows rB..(r+1)B-1 of the global batch
    epochs = [starts[e * 99:(e + 1) * 99] for e in range(3)]
    for order in epochs:
        assert sorted(order) == all_windows  # each window exactly once an epoch
    assert epochs[0] != epochs[1] != epochs[2]
    assert all(loader.epoch == 3 for loader in loaders)


def test_the_global_batch_is_the_same_for_any_world_size(tmp_path):
    folder = labelled_dir(tmp_path / "d", SIZES)
    single = data.TokenLoader(folder, "train", 8, window=96, seed=3)
    ranks = [data.TokenLoader(folder, "train", 2, window=96, seed=3, rank=r, world_size=4) for r in range(4)]
    for L in [96] * 5 + [24] * 20:  # phase 1 (s = 4, T = 24), the switch, phase 2, through an epoch's end
        assert torch.equal(single.next_rows(L), torch.cat([loader.next_rows(L) for loader in ranks]))


def test_rows_of_a_step_and_of_consecutive_steps_come_from_unrelated_places(tmp_path):
    # the old loader served a step's rows back to back from one stretch of text: every pair adjacent
    folder = labelled_dir(tmp_path / "d", [40_000, 60_000])
    loader = data.TokenLoader(folder, "train", 16, window=64)  # 1,561 windows
    previous, near, pairs = None, 0, 0
    for _ in range(200):
        starts = places(loader.next_rows(64))
        gaps = np.abs(starts[:, None] - starts[None, :])[np.triu_indices(16, 1)]
        near += (gaps <= 64).sum()  # the same or neighbouring windows
        pairs += len(gaps)
        if previous is not None:
            gaps = np.abs(starts[:, None] - previous[None, :]).ravel()
            near += (gaps <= 64).sum()
            pairs += len(gaps)
        previous = starts
    # independent windows would be neighbours in 2/1,561 = 0.13% of pairs; some repeat in the second epoch's steps
    assert near / pairs < 0.005


def test_a_stage_switch_reads_only_untouched_windows_and_no_token_twice_an_epoch(tmp_path):
    folder = labelled_dir(tmp_path / "d", SIZES)
    T, s, B = 12, 4, 3
    loader = data.TokenLoader(folder, "train", B, window=s * T, seed=1)  # 14 + 20 + 14 = 48 windows of 48 tokens
    bases = np.cumsum([0] + SIZES)
    into_window = lambda start: (start - bases[np.searchsorted(bases, start, side="right") - 1]) % (s * T)
    served, pieces = [[]], []  # the tokens read in each epoch (as inputs); where in its window each row starts
    for L in [s * T] * 5 + [T] * 200:  # 15 windows in phase 1, then phase 2 on the 33 left, then whole epochs
        epoch = loader.epoch
        rows = loader.next_rows(L)
        assert rows.shape == (B, L + 1) and rows.dtype == torch.int64
        pieces += [into_window(start) for start in places(rows)]
        if loader.epoch != epoch:
            served.append([])
        served[-1] += [t for row in rows[:, :-1].tolist() for t in row]
    assert loader.epoch >= 3
    for tokens in served[:-1]:
        assert len(tokens) == len(set(tokens))  # nothing twice in an epoch, across the switch too
    # every epoch after the first (which the switch cut short) reads every token of every window
    assert sorted(served[1]) == [t for start in windows_of(SIZES, s * T) for t in range(start, start + s * T)]
    # phase 2 takes piece 0 of each of the 33 windows phase 1 left, then piece 1, ...: rows of a window are 33 apart
    assert pieces[:15] == [0] * 15 and pieces[15:15 + 33] == [0] * 33 and pieces[15 + 33:15 + 66] == [T] * 33
    with pytest.raises(ValueError, match="window of 48 tokens must be a whole number of rows"):
        loader.next_rows(20)


@pytest.mark.parametrize("world_size", [1, 2])
def test_resume_anywhere_returns_exactly_the_rows_of_an_uninterrupted_run(tmp_path, world_size):
    folder = labelled_dir(tmp_path / "d", SIZES)
    schedule = [4 * 24] * 6 + [24] * 40  # s=4, T=24: a switch after 6 steps, an epoch's end in phase 2
    make = lambda: data.TokenLoader(folder, "train", 2, window=96, seed=3, rank=world_size - 1, world_size=world_size)
    straight = make()
    expected, states = [], []
    for L in schedule:
        states.append(straight.state_dict())
        expected.append(straight.next_rows(L))
    assert straight.epoch >= 1
    for k in range(len(schedule)):  # every step: mid phase 1, at the switch, at the epoch's end, after both
        path = tmp_path / f"ckpt{k}.pt"
        torch.save({"loader": states[k]}, path)
        resumed = make()
        resumed.load_state_dict(torch.load(path, weights_only=True)["loader"])  # plain ints and strings
        for L, rows in zip(schedule[k:], expected[k:]):
            assert torch.equal(resumed.next_rows(L), rows)

    # the state is global, so another world size picks up where the two ranks stopped
    two = [data.TokenLoader(folder, "train", 2, window=96, rank=r, world_size=2) for r in range(2)]
    for L in [96] * 3 + [24] * 2:
        [loader.next_rows(L) for loader in two]
    one = data.TokenLoader(folder, "train", 4, window=96)
    one.load_state_dict(two[0].state_dict())
    assert torch.equal(one.next_rows(24), torch.cat([loader.next_rows(24) for loader in two]))

    # a state of the old loader (one stream of consecutive text) is refused by name
    old = {"split": "train", "seed": 3, "tokens": 2400, "chunk_tokens": 128, "separator": [2400], "position": 960}
    with pytest.raises(UserError, match="loader state has no 'window'.*stretches of consecutive text"):
        make().load_state_dict(old)
    with pytest.raises(UserError, match=r"read other windows \{'window': \(96, 48\)\}.*same data folder"):
        data.TokenLoader(folder, "train", 2, window=48, seed=3).load_state_dict(states[0])


def test_the_same_seed_gives_the_same_rows_and_another_seed_another_order(tmp_path):
    folder = labelled_dir(tmp_path / "d", SIZES)
    rows = lambda seed: torch.cat([data.TokenLoader(folder, "train", 4, window=32, seed=seed).next_rows(32)
                                   for _ in range(3)])
    assert torch.equal(rows(0), rows(0)) and not torch.equal(rows(0), rows(1))


def test_an_epoch_wrap_is_reported(tmp_path, capsys):
    folder = labelled_dir(tmp_path / "d", SIZES)  # 2 * 9 + 1 * 12 ... = windows of 24: 99
    loaders = [data.TokenLoader(folder, "train", 11, window=24, rank=r, world_size=3) for r in range(3)]
    for _ in range(3):  # 3 * 33 = 99 rows: the whole epoch
        [loader.next_rows(24) for loader in loaders]
    assert loaders[0].epoch == 0 and capsys.readouterr().out == ""
    [loader.next_rows(24) for loader in loaders]
    assert [loader.epoch for loader in loaders] == [1, 1, 1]
    assert capsys.readouterr().out.count("epoch 1 starts") == 1  # once, from rank 0


# -----------------------------------------------------------------------------
# Bad input fails early and says what to do


def test_missing_or_empty_sources(tmp_path):
    with pytest.raises(UserError, match="nothing/here"):
        prepare.prepare(str(tmp_path / "nothing/here/*.txt"), "bytes", tmp_path / "out")
    source = write_docs(tmp_path / "empty", ["", ""])
    with pytest.raises(UserError, match="none left for training"):
        prepare.prepare(source, "bytes", tmp_path / "out", num_proc=1)
    with pytest.raises(UserError, match="several kinds"):
        write_docs(tmp_path / "mixed", ["x"], ".jsonl")
        write_docs(tmp_path / "mixed", ["y"], ".txt")
        prepare.prepare(str(tmp_path / "mixed" / "*"), "bytes", tmp_path / "out2")
    with pytest.raises(UserError, match="unknown tokenizer 'bites'"):
        prepare.prepare(source, "bites", tmp_path / "out")


def test_bad_tokenizers(tmp_path, monkeypatch):
    with pytest.raises(UserError, match="nope.model"):
        data.get_tokenizer(f"llama3:{tmp_path / 'nope.model'}")
    (tmp_path / "tokenizer.json").write_text('{"model": {"vocab": {}}}\n')
    with pytest.raises(UserError, match="tokenizer.json, line 1.*tiktoken-format"):
        data.get_tokenizer(f"llama3:{tmp_path / 'tokenizer.json'}")
    with pytest.raises(UserError, match="all 256 single bytes"):
        data.get_tokenizer(write_ranks(tmp_path / "gap.model", [bytes([b]) for b in range(255)]))

    def offline(name):
        raise ConnectionError("Failed to resolve 'openaipublic.blob.core.windows.net'")
    monkeypatch.setattr(data.tiktoken, "get_encoding", offline)
    with pytest.raises(UserError, match="'o200k_base'.*TIKTOKEN_CACHE_DIR"):
        data.get_tokenizer("o200k_base")


def test_a_vocabulary_too_large_for_the_shard_dtype(tmp_path):
    pairs = [bytes([a, b]) for a in range(256) for b in range(256)]  # 65,792 ranks + 256 specials
    name = write_ranks(tmp_path / "big.model", [bytes([b]) for b in range(256)] + pairs)
    source = write_docs(tmp_path / "docs", ["hi"])
    with pytest.raises(UserError, match="66,048 ids, too many for --dtype uint16"):
        prepare.prepare(source, name, tmp_path / "out", dtype="uint16")
    with pytest.raises(ValueError, match="70000 does not fit uint16"):
        data.write_shard(tmp_path / "x.bin", [1, 70000], "uint16")
    folder = labelled_dir(tmp_path / "d", [100])
    meta = json.loads((folder / "meta.json").read_text())
    (folder / "meta.json").write_text(json.dumps({**meta, "vocab_size": 70000, "dtype": "uint16"}))
    with pytest.raises(UserError, match="meta.json: vocab_size 70,000 does not fit dtype uint16"):
        data.TokenLoader(folder, "train", 1, window=8)


def test_bad_shards_and_folders(tmp_path):
    with pytest.raises(UserError, match="meta.json not found.*not a prepared data folder.*python prepare.py"):
        data.TokenLoader(tmp_path, "train", 1, window=8)
    folder = labelled_dir(tmp_path / "d", SIZES)
    with pytest.raises(UserError, match="no 'val' split"):
        data.TokenLoader(folder, "val", 1, window=8)
    shard = folder / "train_000001.bin"
    good = shard.read_bytes()
    shard.write_bytes(b"NOTTOKEN" + good[8:])
    with pytest.raises(UserError, match="train_000001.bin is not a tst token shard"):
        data.TokenLoader(folder, "train", 1, window=8)
    shard.write_bytes(good[:len(good) // 2])
    with pytest.raises(UserError, match="train_000001.bin is truncated"):
        data.TokenLoader(folder, "train", 1, window=8)


def test_a_token_id_past_the_vocabulary_is_named_before_the_model_sees_it(tmp_path):
    # today's folders: each shard's largest id is in meta.json, checked without reading the shards again
    prepare.prepare(write_docs(tmp_path / "docs", make_docs(30)), "bytes", tmp_path / "new", val_tokens=200, num_proc=1)
    meta_path = tmp_path / "new" / "meta.json"
    meta = json.loads(meta_path.read_text())
    assert data.check_token_ids(tmp_path / "new", 257) == meta and data.check_token_ids(tmp_path / "new", 300) == meta
    with pytest.raises(UserError, match=r"vocab_size=200 is smaller than the data's vocabulary \(257 ids, tokenizer "
                                        r"bytes, .*new/val_000000.bin holds id 256\): use 0"):
        data.check_token_ids(tmp_path / "new", 200)
    meta_path.write_text(json.dumps({**meta, "vocab_size": 200}))
    for check in (lambda: data.load_meta(tmp_path / "new"),
                  lambda: data.TokenLoader(tmp_path / "new", "train", 1, window=8)):
        with pytest.raises(UserError, match=r"new/val_000000.bin holds token id 256 \(as .*meta.json records it\), "
                                            r"outside its vocab_size of 200.*python prepare.py --source"):
            check()
    meta_path.write_text(json.dumps({**meta, "vocab_size": 1000}))  # accepted by the shards, not by the tokenizer
    with pytest.raises(UserError, match="meta.json: vocab_size 1,000, but tokenizer 'bytes' has 257 ids.*set it "
                                        "back to 257"):
        data.check_token_ids(tmp_path / "new", 1000)

    # folders prepared before ids were recorded: the loader checks each slice it reads, the validation rows theirs
    old = labelled_dir(tmp_path / "old", SIZES, record_max=False)
    meta = json.loads((old / "meta.json").read_text())
    (old / "meta.json").write_text(json.dumps({**meta, "vocab_size": 1500, "eot": 0}))  # ids 1500..2399 are past it
    assert data.check_token_ids(old, 1500)["vocab_size"] == 1500  # nothing recorded, nothing read
    loader = data.TokenLoader(old, "train", 2, window=64)
    with pytest.raises(UserError, match=r"old/train_00000[12].bin holds token id (1,[5-9]|2,[0-3])\d\d \(its token "
                                        r"\d+\), outside the data's vocabulary of 1,500 ids.*delete it and re-run "
                                        r"python prepare.py --source test"):
        for _ in range(100):
            loader.next_rows(64)
    old_val = labelled_dir(tmp_path / "old_val", SIZES, split="val", record_max=False)
    meta = json.loads((old_val / "meta.json").read_text())
    (old_val / "meta.json").write_text(json.dumps({**meta, "vocab_size": 1000, "eot": 0}))
    with pytest.raises(UserError, match=r"old_val/val_000001.bin holds token id 1,000 \(its token 300\)"):
        data.validation_rows(old_val, 64, 1000)


def test_a_damaged_meta_json_is_named_with_the_command_that_remakes_the_folder(tmp_path):
    source = write_docs(tmp_path / "docs", make_docs(20))
    out = tmp_path / "out"
    kw = dict(val_tokens=0, shard_tokens=700, num_proc=1)
    reference = prepare.prepare(source, "bytes", out, **kw)
    meta_path = out / "meta.json"
    good = meta_path.read_text()
    general = f"python prepare.py --source SOURCE --tokenizer TOKENIZER --out_dir {out}"
    for text, problem in [(good[:len(good) // 2], r"is not JSON \(.*\(char \d+\)\)"), ("[]", "is not a JSON object")]:
        meta_path.write_text(text)
        # loading it and preparing into it again say the same
        for call in (lambda: data.load_meta(out), lambda: prepare.prepare(source, "bytes", out, **kw)):
            with pytest.raises(UserError, match=f"meta.json {problem}: it is damaged. Delete it and prepare the folder "
                                                f"again with {re.escape(general)}$"):
                call()
    meta_path.write_text(json.dumps({k: v for k, v in reference.items() if k not in ("shards", "done")}))
    with pytest.raises(UserError, match="meta.json lacks shards, done: it is damaged") as damaged:
        data.load_meta(out)
    command = shlex.split(str(damaged.value).split("again with ")[1])
    assert command[:8] == ["python", "prepare.py", "--source", source, "--tokenizer", "bytes", "--out_dir", str(out)]
    meta_path.unlink()  # as the message says: then its command remakes the folder
    assert prepare.prepare(source, "bytes", out, **kw) == reference


def test_meta_json_records_its_format_and_the_corpus_it_read(tmp_path, monkeypatch):
    docs = make_docs(120, seed=8)
    source = write_docs(tmp_path / "docs", docs)
    kw = dict(val_tokens=1000, shard_tokens=2000, num_proc=1)
    meta = prepare.prepare(source, "bytes", tmp_path / "ref", **kw)
    text = "".join(docs).encode("utf-8")
    assert meta["format"] == 2
    assert meta["corpus"] == {"documents": 120, "bytes": len(text), "sha256": hashlib.sha256(text).hexdigest()}
    # a preparation resumed after an interruption records the same corpus
    monkeypatch.setattr(prepare, "BATCH_CHARS", 300)
    prepare_until_a_power_cut(monkeypatch, 90, source, "bytes", tmp_path / "out", **kw)
    assert prepare.prepare(source, "bytes", tmp_path / "out", **kw)["corpus"] == meta["corpus"]
    # and so does a preparation stopped by --max_tokens and extended: its documents so far, then all of them
    part = prepare.prepare(source, "bytes", tmp_path / "part", max_tokens=1000, **kw)["corpus"]
    read = "".join(docs[:part["documents"]]).encode("utf-8")
    assert 0 < part["documents"] < 120 and part["sha256"] == hashlib.sha256(read).hexdigest()
    assert prepare.prepare(source, "bytes", tmp_path / "part", **kw)["corpus"] == meta["corpus"]
    # a folder prepared before these were recorded still loads
    old = labelled_dir(tmp_path / "old", SIZES)
    assert "format" not in data.load_meta(old) and "corpus" not in data.load_meta(old)


@pytest.mark.parametrize("edit, says", [
    (lambda m: m.update(vocab_size="257"), r'vocab_size "257", not a positive whole number'),
    (lambda m: m.update(shards={}), r"shards \{\}, not a list"),
    (lambda m: m.update(done="yes"), r'done "yes", not true or false'),
    (lambda m: m.update(dtype="int8"), r'dtype "int8", not uint16 or uint32'),
    (lambda m: m.update(bos=1.5), r"bos 1.5, not a whole number or null"),
    (lambda m: m.update(source=["a", "b"]), r'source \["a", "b"\], not text'),
    (lambda m: m.update(corpus=[]), r"corpus \[\], not an object"),
    (lambda m: m["shards"][1].pop("tokens"), r"shards\[1\] without tokens"),
    (lambda m: m["shards"][0].update(split="test"), r'shards\[0\].split "test", not val or train'),
    (lambda m: m["shards"].append("val_000009.bin"), r'shards\[\d+\] "val_000009.bin", not an object'),
])
def test_a_meta_json_field_of_the_wrong_type_is_named(tmp_path, edit, says):
    source = write_docs(tmp_path / "docs", make_docs(20))
    out = tmp_path / "out"
    prepare.prepare(source, "bytes", out, val_tokens=500, shard_tokens=700, num_proc=1)
    meta = json.loads((out / "meta.json").read_text())
    edit(meta)
    (out / "meta.json").write_text(json.dumps(meta))
    for call in (lambda: data.load_meta(out), lambda: prepare.prepare(source, "bytes", out, num_proc=1)):
        with pytest.raises(UserError, match=f"meta.json has {says}: it is damaged. Delete it and prepare the folder "
                                            f"again with python prepare.py --source "):
            call()


def test_an_edited_end_of_text_id_is_refused(tmp_path):
    prepare.prepare(write_docs(tmp_path / "docs", make_docs(20)), "bytes", tmp_path / "out", val_tokens=0, num_proc=1)
    path = tmp_path / "out" / "meta.json"
    meta = json.loads(path.read_text())
    for key, value, says in (("eot", 10, "end-of-text id 256"), ("bos", 0, "no BOS")):
        path.write_text(json.dumps({**meta, key: value}))
        with pytest.raises(UserError, match=f"meta.json: {key} {value}, but tokenizer 'bytes' has {says}: it was "
                                            f"edited since preparation"):
            data.check_token_ids(tmp_path / "out", 257)


def test_a_missing_data_folder_is_named_without_guessing_its_source(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(UserError) as missing:
        data.load_meta("data/books_gpt2")
    message = str(missing.value)
    assert message.startswith(f"data folder data/books_gpt2 does not exist (a relative path is from the current "
                              f"directory, {tmp_path}): prepare it (python prepare.py --help lists the sources and ")
    assert message.endswith(" with python prepare.py --source SOURCE --tokenizer TOKENIZER --out_dir data/books_gpt2")
    assert "stdlib" not in message
    (tmp_path / "empty").mkdir()
    with pytest.raises(UserError, match="^empty/meta.json not found: empty is not a prepared data folder: prepare it"):
        data.load_meta("empty")


def test_validation_rows_are_spread_evenly_over_the_whole_val_split(tmp_path):
    folder = labelled_dir(tmp_path / "d", SIZES, split="val")  # val token i is i
    everything = data.validation_rows(folder, 64, 1000)  # as many rows as the split holds: every whole window
    assert everything.dtype == torch.int64 and everything.shape == (10 + 15 + 10, 65)
    assert list(places(everything)) == windows_of(SIZES, 64)
    rows = data.validation_rows(folder, 64, 7)
    assert torch.equal(rows, everything[[0, 5, 10, 15, 20, 25, 30]])  # evenly spaced: every shard, not the first
    assert torch.equal(data.validation_rows(folder, 64, 7), rows)  # the same rows every time, for every run
    assert torch.equal(data.validation_rows(folder, 999, 9), torch.arange(700, 1700)[None])  # only shard 1 fits
    with pytest.raises(UserError, match="largest shard 1,000 tokens.*shorter than one row of 1001 tokens.*"
                                        "--val_tokens"):
        data.validation_rows(folder, 1000, 9)
    with pytest.raises(UserError, match="at most 0 validation rows of seq_len 64"):
        data.validation_rows(folder, 64, 0)
    # a damaged shard is found when the rows are asked for, even one past the rows (train.py checks at start-up)
    last = folder / "val_000002.bin"
    last.write_bytes(last.read_bytes()[:-4])
    for check in (lambda: data.validation_rows(folder, 64, 1), lambda: data.TokenLoader(folder, "val", 1, window=8)):
        with pytest.raises(UserError, match="val_000002.bin is truncated.*re-run python prepare.py --source test"):
            check()
    with pytest.raises(UserError, match="no 'val' split"):
        data.validation_rows(labelled_dir(tmp_path / "train_only", SIZES), 64, 5)


def test_a_window_longer_than_every_shard_and_a_foreign_loader_state(tmp_path):
    folder = labelled_dir(tmp_path / "d", [50, 60])
    loader = data.TokenLoader(folder, "train", 1, window=59)
    assert loader.windows == 1 and loader.next_rows(59).shape == (1, 60)
    with pytest.raises(UserError, match=r"rows of 61 tokens do not fit any shard of the 'train' split .*\(its largest: "
                                        r"60 tokens\).*smaller seq_len or s"):
        data.TokenLoader(folder, "train", 1, window=60)
    with pytest.raises(UserError, match="seed"):
        data.TokenLoader(folder, "train", 1, window=59, seed=1).load_state_dict(loader.state_dict())


@pytest.mark.parametrize("setting", [{"val_tokens": -1}, {"shard_tokens": 0}, {"max_tokens": 0}, {"num_proc": 0}])
def test_nonsense_sizes_are_refused_before_anything_is_written(tmp_path, setting):
    (name, value), = setting.items()
    with pytest.raises(UserError, match=f"--{name} {value}: it must be at least"):
        prepare.prepare(write_docs(tmp_path / "docs", make_docs(5)), "bytes", tmp_path / "out", **setting)
    assert not (tmp_path / "out").exists()


def test_rerunning_with_other_settings_is_refused(tmp_path):
    source = write_docs(tmp_path / "docs", make_docs(5))
    prepare.prepare(source, "bytes", tmp_path / "out", val_tokens=0, num_proc=1)
    with pytest.raises(UserError, match="other settings.*val_target.*made by python prepare.py .*--val_tokens 0"):
        prepare.prepare(source, "bytes", tmp_path / "out", val_tokens=10, num_proc=1)


def test_suggested_commands_survive_the_shell(tmp_path, monkeypatch):
    books = write_docs(tmp_path / "my books", make_docs(60, seed=4))  # a glob, in a folder whose name has a space
    out = tmp_path / "out [v1]"
    with pytest.raises(UserError, match="does not exist") as missing:
        data.load_meta(out)
    assert shlex.split(str(missing.value).split(" with ")[-1])[-2:] == ["--out_dir", str(out)]

    kw = dict(val_tokens=500, shard_tokens=1000, num_proc=1)
    monkeypatch.setattr(prepare, "BATCH_CHARS", 300)
    prepare_until_a_power_cut(monkeypatch, 40, books, "bytes", out, **kw)
    with pytest.raises(UserError, match="only partly prepared") as partial:
        data.load_meta(out)
    command = str(partial.value).split("finish it with ")[1]
    assert command.startswith("python prepare.py ")
    # pasted into a shell, the glob must reach prepare.py unexpanded and each folder name in one piece
    subprocess.run(shlex.quote(sys.executable) + command[len("python"):], shell=True, cwd=ROOT, check=True,
                   capture_output=True)
    prepare.prepare(books, "bytes", tmp_path / "reference", **kw)
    for split in data.SPLITS:
        assert np.array_equal(split_stream(out, split), split_stream(tmp_path / "reference", split))


def test_the_command_line_reports_each_user_mistake_in_one_line(tmp_path):
    tiny = write_docs(tmp_path / "tiny", ["a short book"])
    prepare.prepare(tiny, "bytes", tmp_path / "made", val_tokens=0, num_proc=1)
    (tmp_path / "a_file").write_text("")
    (tmp_path / "empty_cache").mkdir()
    no_network = {**os.environ, "TIKTOKEN_CACHE_DIR": str(tmp_path / "empty_cache"), "NO_PROXY": "", "no_proxy": "",
                  **{k: "http://127.0.0.1:9" for k in ("HTTPS_PROXY", "https_proxy", "HTTP_PROXY", "http_proxy")}}
    fine = ["--source", tiny, "--tokenizer", "bytes", "--out_dir", tmp_path / "out", "--num_proc", "1"]
    none_left = fine + ["--out_dir", tmp_path / "none_left"]
    cases = {  # what the one line must say: the command line (the first after its tokenizer processes ended)
        "none left for training after the 1,000,000 validation tokens": none_left,
        "unknown tokenizer 'bites'": fine + ["--tokenizer", "bites"],
        "nothing/*.txt': no such dataset or local file": fine + ["--source", tmp_path / "nothing" / "*.txt"],
        "other settings {'val_target': (0, 10)}": fine + ["--out_dir", tmp_path / "made", "--val_tokens", "10"],
        "a_file/out cannot be created": fine + ["--out_dir", tmp_path / "a_file" / "out"],
        "--shard_tokens 0: it must be at least 1": fine + ["--shard_tokens", "0"],
        "could not download the 'gpt2' encoding": fine + ["--tokenizer", "gpt2"],
    }
    if os.geteuid() != 0:  # root writes into read-only folders
        (tmp_path / "locked").mkdir(mode=0o500)
        cases["locked is read-only"] = fine + ["--out_dir", tmp_path / "locked"]
    # python data.py, preparation's old command line, is an alias of prepare.py: it takes one of the cases
    script = lambda args: "data.py" if args is none_left else "prepare.py"
    runs = {expected: subprocess.Popen([sys.executable, script(args), *map(str, args)], cwd=ROOT, text=True,
                                       stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=no_network)
            for expected, args in cases.items()}  # at once: each spends most of its time importing its modules
    for expected, run in runs.items():
        stdout, stderr = run.communicate(timeout=120)
        assert run.returncode == 1 and "Traceback" not in stdout + stderr, stderr
        assert len(stderr.splitlines()) == 1 and stderr.startswith("error: ") and expected in stderr, stderr
        assert ("`python data.py` is now `python prepare.py`" in stdout) == (run.args[1] == "data.py")
    assert not (tmp_path / "none_left").exists()
    bad_count = subprocess.run([sys.executable, "prepare.py", *map(str, fine), "--max_tokens", "inf"], cwd=ROOT,
                               capture_output=True, text=True)
    assert bad_count.returncode == 2 and "invalid count value: 'inf'" in bad_count.stderr  # argparse's usage error



def test_llama3_documents_start_after_end_of_text_then_bos(tmp_path):
    # Llama 3 models are evaluated after <|begin_of_text|>, so every training document starts after it too
    tok_name = write_ranks(tmp_path / "tokenizer.model", [bytes([b]) for b in range(256)] + [b"he", b"ll"])
    tok = data.get_tokenizer(tok_name)
    docs = ["hello", "all well"]
    prepare.prepare(write_docs(tmp_path / "docs", docs), tok_name, tmp_path / "out", val_tokens=0, num_proc=1)
    expected = [t for d in docs for t in [tok.eot, tok.bos] + tok.encode(d)]
    assert list(split_stream(tmp_path / "out", "train")) == expected
