"""data.py: text -> shards -> rows, for both TST phases, under DDP and across resumes; and every bad input."""

import base64
import json
import os
import random
import shlex
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

import data
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


def test_a_vocabulary_over_uint16_gets_uint32_shards(shared_data, monkeypatch, tmp_path):
    monkeypatch.setenv("TIKTOKEN_CACHE_DIR", str(shared_data / "tiktoken_cache"))
    docs = ["Hello world", "the end"]
    meta = data.prepare(write_docs(tmp_path / "docs", docs), "cl100k_base", tmp_path / "out", val_tokens=0, num_proc=1)
    assert meta["dtype"] == "uint32"
    tokens = split_stream(tmp_path / "out", "train")
    assert tokens.dtype == np.uint32 and list(tokens) == list(expected_tokens(data.get_tokenizer("cl100k_base"), docs))


# -----------------------------------------------------------------------------
# Preparation


def test_round_trip_text_to_shards_to_rows_to_text(tmp_path):
    docs = make_docs(300)
    tok = data.get_tokenizer("bytes")
    meta = data.prepare(write_docs(tmp_path / "docs", docs), "bytes", tmp_path / "out", val_tokens=2000,
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

    # in one shard and one chunk, an epoch of rows is the text itself, in both phases' row lengths
    data.prepare(write_docs(tmp_path / "docs", docs), "bytes", tmp_path / "one", val_tokens=2000, num_proc=2)
    s, T = 6, 16
    loader = data.TokenLoader(tmp_path / "one", "train", 4, chunk_tokens=len(train))
    inputs, last = [], None
    while loader.position + 4 * s * T <= len(train):  # phase 1 for half the data, then phase 2
        L = s * T if loader.position < len(train) // 2 else T
        rows = loader.next_rows(L)
        assert rows.shape == (4, L + 1) and rows.dtype == torch.int64
        assert last is None or last == rows[0, 0]  # the label token of a row is the next row's first input
        inputs += [r[:-1] for r in rows]
        last = rows[-1, -1]
    stream = torch.cat(inputs)
    assert tok.decode(stream) == tok.decode(train[:len(stream)])


def test_stdlib_is_the_offline_default_corpus(tmp_path):
    metas = [data.prepare("stdlib", "bytes", tmp_path / d, val_tokens=20_000, max_tokens=50_000) for d in "ab"]
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
    data.prepare(source, "bytes", tmp_path / "out", val_tokens=0, text_field="content", num_proc=1)
    assert np.array_equal(split_stream(tmp_path / "out", "train"), expected_tokens(data.get_tokenizer("bytes"), docs))
    with pytest.raises(UserError, match="no column 'text'.*content"):
        data.prepare(source, "bytes", tmp_path / "out2", num_proc=1)
    # found while reading, not inside a tokenizer process, where it would fail far from its cause
    with pytest.raises(UserError, match="column 'id' holds int, not text"):
        data.prepare(source, "bytes", tmp_path / "out3", text_field="id", num_proc=2)


def test_a_mix_follows_its_weights_and_stops_when_a_source_runs_out(tmp_path, capsys):
    a_docs = [f"a{i}".ljust(29, "a") for i in range(4)]  # 30 characters a document, with its separator
    b_docs = [f"b{i}".ljust(9, "b") for i in range(100)]  # 10
    source = f"3*{write_docs(tmp_path / 'a', a_docs)},1*{write_docs(tmp_path / 'b', b_docs)}"
    data.prepare(source, "bytes", tmp_path / "out", val_tokens=0, num_proc=1)
    out = data.get_tokenizer("bytes").decode(split_stream(tmp_path / "out", "train")).split(EOT_TEXT)[1:]
    assert [d for d in out if d[0] == "a"] == a_docs  # each source in its own order, all of the scarce one
    assert [d for d in out if d[0] == "b"] == b_docs[:len(out) - 4]
    share = [0, 0]
    for d in out:  # by characters, a mix never strays from its weights by more than one document
        share[d[0] == "b"] += (len(d) + 1) / (3 if d[0] == "a" else 1)
        assert abs(share[0] - share[1]) <= 10
    assert len(out) < 20 and "ran out" in capsys.readouterr().out


def prepare_until_a_power_cut(monkeypatch, n_docs, *args, **kw):
    """data.prepare(*args, **kw), stopped by an exception when it asks for document n_docs."""
    real = data._documents

    def power_cut(*source):
        for i, doc in enumerate(real(*source)):
            if i == n_docs:
                raise RuntimeError("power cut")
            yield doc
    with monkeypatch.context() as m:
        m.setattr(data, "_documents", power_cut)
        with pytest.raises(RuntimeError, match="power cut"):
            data.prepare(*args, **kw)


def test_an_interrupted_or_damaged_preparation_resumes_to_the_same_shards(tmp_path, monkeypatch):
    monkeypatch.setattr(data, "BATCH_CHARS", 300)  # many small tokenizer tasks
    source = write_docs(tmp_path / "docs", make_docs(120, seed=2))
    kw = dict(val_tokens=1000, shard_tokens=2000, num_proc=2)
    reference = data.prepare(source, "bytes", tmp_path / "ref", **kw)

    prepare_until_a_power_cut(monkeypatch, 90, source, "bytes", tmp_path / "out", **kw)
    partial = json.loads((tmp_path / "out" / "meta.json").read_text())
    assert not partial["done"] and 2 <= len(partial["shards"]) < len(reference["shards"])
    with pytest.raises(UserError, match="only partly prepared.*python data.py --source .* --val_tokens 1000 "
                                         "--shard_tokens 2000"):
        data.TokenLoader(tmp_path / "out", "train", 2)
    finished = {s["file"]: os.stat(tmp_path / "out" / s["file"]).st_mtime_ns for s in partial["shards"]}

    def same_as_reference():
        for s in reference["shards"]:
            assert (tmp_path / "out" / s["file"]).read_bytes() == (tmp_path / "ref" / s["file"]).read_bytes()
        assert json.loads((tmp_path / "out" / "meta.json").read_text()) == reference

    assert data.prepare(source, "bytes", tmp_path / "out", **kw) == reference
    same_as_reference()
    assert {f: os.stat(tmp_path / "out" / f).st_mtime_ns for f in finished} == finished  # skipped, not rewritten

    broken = tmp_path / "out" / reference["shards"][3]["file"]
    broken.write_bytes(broken.read_bytes()[:-7])
    with pytest.raises(UserError, match=f"{broken.name} is truncated.*re-run python data.py --source"):
        data.TokenLoader(tmp_path / "out", "train", 2)
    data.prepare(source, "bytes", tmp_path / "out", **kw)
    same_as_reference()


def test_a_preparation_that_fails_before_its_first_train_shard_leaves_the_folder_free(tmp_path, monkeypatch):
    source = write_docs(tmp_path / "docs", make_docs(40, seed=5))
    out = tmp_path / "out"
    with pytest.raises(UserError, match="none left for training.*smaller --val_tokens"):
        data.prepare(source, "bytes", out, num_proc=1)  # the default 1,000,000 val tokens take every document
    assert not out.exists()
    # cut off while writing the val split, in shards of 300 tokens: no meta.json ties the folder to those settings
    monkeypatch.setattr(data, "BATCH_CHARS", 300)  # small tokenizer tasks, so that shards are written before the cut
    prepare_until_a_power_cut(monkeypatch, 20, source, "bytes", out, val_tokens=5000, shard_tokens=300, num_proc=1)
    assert len(list(out.glob("val_*.bin"))) >= 2 and not (out / "meta.json").exists()

    kw = dict(val_tokens=500, shard_tokens=300, num_proc=1)
    meta = data.prepare(source, "bytes", out, **kw)
    assert meta == data.prepare(source, "bytes", tmp_path / "fresh", **kw)
    for split in data.SPLITS:
        assert np.array_equal(split_stream(out, split), split_stream(tmp_path / "fresh", split))


def test_max_tokens_stops_early_and_a_rerun_extends_the_same_stream(tmp_path):
    source = write_docs(tmp_path / "docs", make_docs(80, seed=3))
    full = data.prepare(source, "bytes", tmp_path / "full", val_tokens=500, num_proc=2)
    part = data.prepare(source, "bytes", tmp_path / "out", val_tokens=500, max_tokens=1000, num_proc=2)
    assert 1000 <= part["train_tokens"] < full["train_tokens"] and not part["exhausted"]
    assert data.prepare(source, "bytes", tmp_path / "out", val_tokens=500, max_tokens=1000, num_proc=2) == part
    data.prepare(source, "bytes", tmp_path / "out", val_tokens=500, num_proc=2)
    for split in data.SPLITS:
        assert np.array_equal(split_stream(tmp_path / "out", split), split_stream(tmp_path / "full", split))


# -----------------------------------------------------------------------------
# The loader, on a folder whose token i is i: every token names its own place in the split


def labelled_dir(folder, sizes, split="train"):
    folder.mkdir()
    shards, base = [], 0
    for i, n in enumerate(sizes):
        data.write_shard(folder / f"{split}_{i:06d}.bin", np.arange(base, base + n), "uint32")
        shards.append({"file": f"{split}_{i:06d}.bin", "split": split, "tokens": n, "docs_end": 0})
        base += n
    meta = {"source": "test", "tokenizer": "none", "vocab_size": base, "dtype": "uint32", "text_field": "text",
            "val_target": base if split == "val" else 0, "shard_tokens": max(sizes), "done": True, "shards": shards}
    (folder / "meta.json").write_text(json.dumps(meta))
    return folder


def reference_stream(sizes, chunk, seed, epochs):
    """The order the module docstring promises, spelled out: chunks that never span shards, re-permuted each epoch."""
    bases = np.cumsum([0] + sizes)
    chunks = [np.arange(b + s, b + min(s + chunk, n)) for b, n in zip(bases, sizes) for s in range(0, n, chunk)]
    orders = [np.random.default_rng([seed, e]).permutation(len(chunks)) for e in range(epochs)]
    return np.concatenate([chunks[i] for order in orders for i in order])


SIZES, CHUNK = [700, 1000, 700], 128  # 2400 tokens, 21 chunks, some short


def test_rows_are_windows_of_the_shuffled_stream_in_both_phases(tmp_path):
    folder = labelled_dir(tmp_path / "d", SIZES)
    ref = reference_stream(SIZES, CHUNK, seed=7, epochs=5)
    loaders = [data.TokenLoader(folder, "train", 3, seed=7, rank=r, world_size=2, chunk_tokens=CHUNK) for r in range(2)]
    position = 0
    for L in [6 * 16] * 9 + [16] * 40 + [5 * 16] * 5:  # phase 1 (s=6, T=16), the switch, phase 2, and back
        for rank, loader in enumerate(loaders):
            rows = loader.next_rows(L)
            assert rows.shape == (3, L + 1) and rows.dtype == torch.int64
            for i, row in enumerate(rows):
                start = position + (rank * 3 + i) * L
                assert np.array_equal(row.numpy(), ref[start:start + L + 1])
        position += 2 * 3 * L
    assert loaders[0].epoch == position // sum(SIZES) >= 2  # it went through two epoch boundaries


@pytest.mark.parametrize("world_size", [2, 4])
def test_ranks_read_disjoint_rows_that_cover_the_split(tmp_path, world_size):
    folder = labelled_dir(tmp_path / "d", SIZES)
    B, L = 3, 10
    loaders = [data.TokenLoader(folder, "train", B, rank=r, world_size=world_size, chunk_tokens=CHUNK)
               for r in range(world_size)]
    single = data.TokenLoader(folder, "train", world_size * B, chunk_tokens=CHUNK)
    for epoch in range(2):
        inputs = []
        for _ in range(sum(SIZES) // (world_size * B * L)):
            everyone = single.next_rows(L)
            for r, loader in enumerate(loaders):
                rows = loader.next_rows(L)
                assert torch.equal(rows, everyone[r * B:(r + 1) * B])  # rank r has rows rB..(r+1)B-1 of the step
                inputs.append(rows[:, :-1].flatten())
        inputs = torch.cat(inputs)
        assert torch.equal(inputs.sort().values, torch.arange(sum(SIZES)))  # every token once: disjoint, complete
        if epoch == 0:
            first_order = inputs
    assert not torch.equal(inputs, first_order)  # the second epoch is another order
    assert all(loader.epoch == 2 for loader in loaders)


def test_resume_anywhere_returns_exactly_the_rows_of_an_uninterrupted_run(tmp_path):
    folder = labelled_dir(tmp_path / "d", SIZES)
    schedule = [4 * 24] * 6 + [24] * 20  # s=4, T=24: a phase switch after 6 steps, an epoch wrap after 7
    make = lambda: data.TokenLoader(folder, "train", 2, seed=3, rank=1, world_size=2, chunk_tokens=CHUNK)
    straight = make()
    expected, states = [], []
    for L in schedule:
        states.append(straight.state_dict())
        expected.append(straight.next_rows(L))
    assert straight.epoch == 1
    for k in [0, 3, 6, 7, 8, len(schedule) - 1]:  # mid phase 1, at the switch, at the wrap, after both
        path = tmp_path / f"ckpt{k}.pt"
        torch.save({"loader": states[k]}, path)
        resumed = make()
        resumed.load_state_dict(torch.load(path, weights_only=True)["loader"])  # plain ints and strings
        for L, rows in zip(schedule[k:], expected[k:]):
            assert torch.equal(resumed.next_rows(L), rows)

    # the position is global, so another world size picks up where the two ranks stopped
    two = [data.TokenLoader(folder, "train", 2, rank=r, world_size=2, chunk_tokens=CHUNK) for r in range(2)]
    for _ in range(5):
        [loader.next_rows(24) for loader in two]
    one = data.TokenLoader(folder, "train", 4, chunk_tokens=CHUNK)
    one.load_state_dict(two[0].state_dict())
    assert torch.equal(one.next_rows(24), torch.cat([loader.next_rows(24) for loader in two]))


def test_a_fresh_validation_loader_gives_the_same_rows_and_seeds_change_the_order(tmp_path):
    folder = labelled_dir(tmp_path / "d", SIZES)
    rows = lambda seed: torch.cat([data.TokenLoader(folder, "train", 4, seed=seed, chunk_tokens=CHUNK).next_rows(32)
                                   for _ in range(3)])
    assert torch.equal(rows(0), rows(0)) and not torch.equal(rows(0), rows(1))


def test_an_epoch_wrap_is_reported(tmp_path, capsys):
    folder = labelled_dir(tmp_path / "d", SIZES)
    loaders = [data.TokenLoader(folder, "train", 10, rank=r, world_size=2, chunk_tokens=CHUNK) for r in range(2)]
    for _ in range(11):  # 11 * 2 * 10 * 10 = 2200 of 2400 tokens
        [loader.next_rows(10) for loader in loaders]
    assert loaders[0].epoch == 0 and capsys.readouterr().out == ""
    [loader.next_rows(10) for loader in loaders]
    assert [loader.epoch for loader in loaders] == [1, 1]
    assert capsys.readouterr().out.count("epoch 1 starts") == 1  # once, from rank 0


# -----------------------------------------------------------------------------
# Bad input fails early and says what to do


def test_missing_or_empty_sources(tmp_path):
    with pytest.raises(UserError, match="nothing/here"):
        data.prepare(str(tmp_path / "nothing/here/*.txt"), "bytes", tmp_path / "out")
    source = write_docs(tmp_path / "empty", ["", ""])
    with pytest.raises(UserError, match="none left for training"):
        data.prepare(source, "bytes", tmp_path / "out", num_proc=1)
    with pytest.raises(UserError, match="several kinds"):
        write_docs(tmp_path / "mixed", ["x"], ".jsonl")
        write_docs(tmp_path / "mixed", ["y"], ".txt")
        data.prepare(str(tmp_path / "mixed" / "*"), "bytes", tmp_path / "out2")
    with pytest.raises(UserError, match="unknown tokenizer 'bites'"):
        data.prepare(source, "bites", tmp_path / "out")


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
        data.prepare(source, name, tmp_path / "out", dtype="uint16")
    with pytest.raises(ValueError, match="70000 does not fit uint16"):
        data.write_shard(tmp_path / "x.bin", [1, 70000], "uint16")
    folder = labelled_dir(tmp_path / "d", [100])
    meta = json.loads((folder / "meta.json").read_text())
    (folder / "meta.json").write_text(json.dumps({**meta, "vocab_size": 70000, "dtype": "uint16"}))
    with pytest.raises(UserError, match="meta.json: vocab_size 70,000 does not fit dtype uint16"):
        data.TokenLoader(folder, "train", 1)


def test_bad_shards_and_folders(tmp_path):
    with pytest.raises(UserError, match="meta.json not found.*python data.py"):
        data.TokenLoader(tmp_path, "train", 1)
    folder = labelled_dir(tmp_path / "d", SIZES)
    with pytest.raises(UserError, match="no 'val' split"):
        data.TokenLoader(folder, "val", 1)
    shard = folder / "train_000001.bin"
    good = shard.read_bytes()
    shard.write_bytes(b"NOTTOKEN" + good[8:])
    with pytest.raises(UserError, match="train_000001.bin is not a tst token shard"):
        data.TokenLoader(folder, "train", 1)
    shard.write_bytes(good[:len(good) // 2])
    with pytest.raises(UserError, match="train_000001.bin is truncated"):
        data.TokenLoader(folder, "train", 1)


def test_validation_rows_are_the_start_of_the_val_split_in_order(tmp_path):
    folder = labelled_dir(tmp_path / "d", SIZES, split="val")  # val token i is i
    rows = data.validation_rows(folder, 64, 1000)
    n = (sum(SIZES) - 1) // 64  # 37 rows of 65 tokens, as many as the split holds
    assert rows.dtype == torch.int64 and torch.equal(rows, torch.arange(n)[:, None] * 64 + torch.arange(65))
    assert torch.equal(rows[1:, 0], rows[:-1, -1])  # each row's last token is the next row's first
    assert torch.equal(data.validation_rows(folder, 64, 5), rows[:5])  # max_rows caps them, from the start
    assert torch.equal(data.validation_rows(folder, sum(SIZES) - 1, 9), torch.arange(sum(SIZES))[None])
    with pytest.raises(UserError, match="2,400 tokens.*shorter than one row of 2401 tokens.*--val_tokens"):
        data.validation_rows(folder, sum(SIZES), 9)
    with pytest.raises(UserError, match="at most 0 validation rows of seq_len 64"):
        data.validation_rows(folder, 64, 0)
    # a damaged shard is found when the rows are asked for, even one past the rows (train.py checks at start-up)
    last = folder / "val_000002.bin"
    last.write_bytes(last.read_bytes()[:-4])
    for check in (lambda: data.validation_rows(folder, 64, 5), lambda: data.TokenLoader(folder, "val", 1)):
        with pytest.raises(UserError, match="val_000002.bin is truncated.*re-run python data.py --source test"):
            check()
    with pytest.raises(UserError, match="no 'val' split"):
        data.validation_rows(labelled_dir(tmp_path / "train_only", SIZES), 64, 5)


def test_a_row_longer_than_the_data_and_a_foreign_loader_state(tmp_path):
    folder = labelled_dir(tmp_path / "d", [50, 50])
    loader = data.TokenLoader(folder, "train", 1)
    assert loader.next_rows(99).shape == (1, 100)
    with pytest.raises(UserError, match="row of 101 tokens is longer than the whole 'train' split"):
        loader.next_rows(100)
    with pytest.raises(UserError, match="seed"):
        data.TokenLoader(folder, "train", 1, seed=1).load_state_dict(loader.state_dict())


@pytest.mark.parametrize("setting", [{"val_tokens": -1}, {"shard_tokens": 0}, {"max_tokens": 0}, {"num_proc": 0}])
def test_nonsense_sizes_are_refused_before_anything_is_written(tmp_path, setting):
    (name, value), = setting.items()
    with pytest.raises(UserError, match=f"--{name} {value}: it must be at least"):
        data.prepare(write_docs(tmp_path / "docs", make_docs(5)), "bytes", tmp_path / "out", **setting)
    assert not (tmp_path / "out").exists()


def test_rerunning_with_other_settings_is_refused(tmp_path):
    source = write_docs(tmp_path / "docs", make_docs(5))
    data.prepare(source, "bytes", tmp_path / "out", val_tokens=0, num_proc=1)
    with pytest.raises(UserError, match="other settings.*val_target.*made by python data.py .*--val_tokens 0"):
        data.prepare(source, "bytes", tmp_path / "out", val_tokens=10, num_proc=1)


def test_suggested_commands_survive_the_shell(tmp_path, monkeypatch):
    books = write_docs(tmp_path / "my books", make_docs(60, seed=4))  # a glob, in a folder whose name has a space
    out = tmp_path / "out [v1]"
    with pytest.raises(UserError, match="meta.json not found") as missing:
        data.load_meta(out)
    assert shlex.split(str(missing.value).split("e.g. ")[1])[-2:] == ["--out_dir", str(out)]

    kw = dict(val_tokens=500, shard_tokens=1000, num_proc=1)
    monkeypatch.setattr(data, "BATCH_CHARS", 300)
    prepare_until_a_power_cut(monkeypatch, 40, books, "bytes", out, **kw)
    with pytest.raises(UserError, match="only partly prepared") as partial:
        data.load_meta(out)
    command = str(partial.value).split("finish it with ")[1]
    assert command.startswith("python data.py ")
    # pasted into a shell, the glob must reach data.py unexpanded and each folder name in one piece
    subprocess.run(shlex.quote(sys.executable) + command[len("python"):], shell=True, cwd=ROOT, check=True,
                   capture_output=True)
    data.prepare(books, "bytes", tmp_path / "reference", **kw)
    for split in data.SPLITS:
        assert np.array_equal(split_stream(out, split), split_stream(tmp_path / "reference", split))


def test_the_command_line_reports_each_user_mistake_in_one_line(tmp_path):
    tiny = write_docs(tmp_path / "tiny", ["a short book"])
    data.prepare(tiny, "bytes", tmp_path / "made", val_tokens=0, num_proc=1)
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
    runs = {expected: subprocess.Popen([sys.executable, "data.py", *map(str, args)], cwd=ROOT, text=True,
                                       stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=no_network)
            for expected, args in cases.items()}  # at once: each spends most of its time importing torch
    for expected, run in runs.items():
        stdout, stderr = run.communicate(timeout=120)
        assert run.returncode == 1 and "Traceback" not in stdout + stderr, stderr
        assert len(stderr.splitlines()) == 1 and stderr.startswith("error: ") and expected in stderr, stderr
    assert not (tmp_path / "none_left").exists()
    bad_count = subprocess.run([sys.executable, "data.py", *map(str, fine), "--max_tokens", "inf"], cwd=ROOT,
                               capture_output=True, text=True)
    assert bad_count.returncode == 2 and "invalid count value: 'inf'" in bad_count.stderr  # argparse's usage error



def test_llama3_documents_start_after_end_of_text_then_bos(tmp_path):
    # Llama 3 models are evaluated after <|begin_of_text|>, so every training document starts after it too
    tok_name = write_ranks(tmp_path / "tokenizer.model", [bytes([b]) for b in range(256)] + [b"he", b"ll"])
    tok = data.get_tokenizer(tok_name)
    docs = ["hello", "all well"]
    data.prepare(write_docs(tmp_path / "docs", docs), tok_name, tmp_path / "out", val_tokens=0, num_proc=1)
    expected = [t for d in docs for t in [tok.eot, tok.bos] + tok.encode(d)]
    assert list(split_stream(tmp_path / "out", "train")) == expected
