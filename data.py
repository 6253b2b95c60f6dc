"""
Data for training: the tokenizers, a prepared data folder (its token shards and meta.json, checked), and the rows both
TST phases train on (TokenLoader) and are evaluated on (validation_rows). prepare.py writes the folders:

    python prepare.py --source books --tokenizer bytes --out_dir data/books_bytes

Shard OUT_DIR/{split}_{index:06d}.bin: a 24-byte little-endian header (b"TSTTOKEN", uint32 format version, uint32 bytes
per token: 2 or 4, uint64 token count), then the tokens, little-endian; meta.json lists the shards (each with its
largest token id, max_id), the settings and, from format 2, the corpus read; load_meta checks it field by field.

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

import base64
import json
import os
import shlex
import struct
from pathlib import Path

import numpy as np
import tiktoken

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


def known_ids(name):
    """{"vocab_size", "eot", "bos"} of tokenizer `name` where they are cheap to know, else None: bytes; llama3:PATH
    where the file is (a rank a line, then the specials); a tiktoken encoding that loads without the network."""
    if name == "bytes":
        tok = get_tokenizer(name)
        return {"vocab_size": tok.n_vocab, "eot": tok.eot, "bos": tok.bos}
    if name.startswith("llama3:"):
        path = name[len("llama3:"):]
        if not os.path.isfile(path):
            return None
        n = len(Path(path).read_bytes().splitlines())
        return {"vocab_size": n + len(LLAMA3_SPECIALS), "eot": n + LLAMA3_SPECIALS.index("<|end_of_text|>"),
                "bos": n + LLAMA3_SPECIALS.index("<|begin_of_text|>")}
    if name in TIKTOKEN_IDS:  # known without its file, which may not be in tiktoken's cache here
        return dict(zip(("vocab_size", "eot", "bos"), TIKTOKEN_IDS[name] + (None,)))
    return None  # no tokenizer of ours (a folder made by hand)


# tiktoken's encodings: (ids, end-of-text id), as tiktoken 0.12 builds them; tests/test_data.py checks them where the
# encodings load
TIKTOKEN_IDS = {"gpt2": (50257, 50256), "r50k_base": (50257, 50256), "p50k_base": (50281, 50256),
                "p50k_edit": (50284, 50256), "cl100k_base": (100277, 100257), "o200k_base": (200019, 199999),
                "o200k_harmony": (201088, 199999)}


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
    try:
        with open(tmp, "wb") as f:
            f.write(HEADER.pack(MAGIC, VERSION, DTYPES[dtype].itemsize, len(tokens)))
            f.write(tokens.astype(DTYPES[dtype]).tobytes())
        os.replace(tmp, path)
    except BaseException:  # a full disk, a signal: nothing half written stays behind
        tmp.unlink(missing_ok=True)
        raise


def read_shard(path, fix="re-run the python prepare.py command that made it"):
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
        how = (f"prepare it (python prepare.py --help lists the sources and tokenizers) with "
               f"{prepare_command({}, data_dir)}")
        if not Path(data_dir).exists():
            raise UserError(f"data folder {data_dir} does not exist (a relative path is from the current directory, "
                            f"{os.getcwd()}): {how}")
        raise UserError(f"{path} not found: {data_dir} is not a prepared data folder: {how}")
    meta = read_meta(path)
    if not meta["done"]:
        raise UserError(f"{data_dir} is only partly prepared: finish it with {prepare_command(meta, data_dir)}")
    if meta.get("format", FORMAT) > FORMAT:
        raise UserError(f"{path} is of format {meta['format']}, from a newer prepare.py; this data.py reads format "
                        f"{FORMAT} and older: update tst")
    if meta["vocab_size"] - 1 > np.iinfo(DTYPES[meta["dtype"]]).max:
        raise UserError(f"{path}: vocab_size {meta['vocab_size']:,} does not fit dtype {meta['dtype']}: "
                        f"prepare again with --dtype uint32")
    for shard in meta["shards"]:
        if shard.get("max_id", -1) >= meta["vocab_size"]:
            raise UserError(f"{Path(data_dir) / shard['file']} holds token id {shard['max_id']:,} (as {path} "
                            f"records it), outside its vocab_size of {meta['vocab_size']:,}: meta.json or the shard "
                            f"has changed since preparation; restore it, or delete the folder and prepare it again "
                            f"with {prepare_command(meta, data_dir)}")
    prefix = [meta["eot"]] + ([meta["bos"]] if meta["bos"] is not None else [])  # what precedes every document
    if max(prefix) >= meta["vocab_size"]:
        raise UserError(f"{path}: the document prefix {prefix} (eot, then bos) is outside its "
                        f"vocab_size of {meta['vocab_size']:,}: meta.json has changed since preparation; restore it, "
                        f"or delete the folder and prepare it again with {prepare_command(meta, data_dir)}")
    return meta


# meta.json: what each field must be. META_KEYS are in every meta.json; the others are checked where present (older
# folders lack some of them: "format" and "corpus" came with format 2)
FORMAT = 2
META_KEYS = ("source", "tokenizer", "vocab_size", "dtype", "eot", "bos", "shards", "done")
SHARD_KEYS = ("file", "split", "tokens", "docs_end")
_WHOLE = (lambda v: type(v) is int and v >= 0, "a whole number")
_TEXT = (lambda v: isinstance(v, str), "text")
META_FIELDS = {
    "source": _TEXT, "tokenizer": _TEXT, "dtype": (lambda v: v in list(DTYPES), " or ".join(DTYPES)),
    "vocab_size": (lambda v: type(v) is int and v > 0, "a positive whole number"), "eot": _WHOLE,
    "bos": (lambda v: v is None or _WHOLE[0](v), "a whole number or null"),
    "shards": (lambda v: type(v) is list, "a list"), "done": (lambda v: type(v) is bool, "true or false"),
    "train_tokens": _WHOLE, "val_tokens": _WHOLE, "format": _WHOLE, "corpus": (lambda v: type(v) is dict, "an object"),
}
SHARD_FIELDS = {"file": _TEXT, "split": (lambda v: v in SPLITS, " or ".join(SPLITS)), "tokens": _WHOLE,
                "docs_end": _WHOLE, "max_id": _WHOLE}


def read_meta(path):
    """meta.json's contents; if it is not what prepare.py writes, a UserError that says how to remake the folder."""
    try:
        meta = json.loads(path.read_text())
        problem = "" if isinstance(meta, dict) else "is not a JSON object"
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        meta, problem = {}, f"is not JSON ({e})"
    if not problem:
        missing = [key for key in META_KEYS if key not in meta]
        problem = f"lacks {', '.join(missing)}" if missing else _wrong_field(meta)
    if problem:
        raise UserError(f"{path} {problem}: it is damaged. Delete it and prepare the folder again with "
                        f"{prepare_command(meta if isinstance(meta, dict) else {}, path.parent)}")
    return meta


def _wrong_field(meta):
    """What is wrong with the first field of meta.json (or of one of its shards) that is not as prepare.py writes it,
    or ''."""
    show = lambda value: json.dumps(value)[:60]
    for key, (ok, what) in META_FIELDS.items():
        if key in meta and not ok(meta[key]):
            return f"has {key} {show(meta[key])}, not {what}"
    for i, shard in enumerate(meta["shards"]):
        if type(shard) is not dict:
            return f"has shards[{i}] {show(shard)}, not an object"
        missing = [key for key in SHARD_KEYS if key not in shard]
        if missing:
            return f"has shards[{i}] without {', '.join(missing)}"
        for key, (ok, what) in SHARD_FIELDS.items():
            if key in shard and not ok(shard[key]):
                return f"has shards[{i}].{key} {show(shard[key])}, not {what}"
    return ""


def prepare_command(meta, out_dir):
    """The python prepare.py command that (re)makes out_dir as meta describes it (SOURCE and TOKENIZER where it does
    not say): every message that tells a user to prepare data shows one."""
    text = lambda key, otherwise: meta[key] if isinstance(meta.get(key), str) else otherwise
    words = ["python", "prepare.py", "--source", text("source", "SOURCE"), "--tokenizer",
             text("tokenizer", "TOKENIZER"), "--out_dir", str(out_dir)]
    for flag, key in (("--val_tokens", "val_target"), ("--shard_tokens", "shard_tokens"),
                      ("--text_field", "text_field"), ("--dtype", "dtype"), ("--max_tokens", "max_tokens")):
        if meta.get(key) is not None:
            words += [flag, str(meta[key])]
    return shlex.join(words)


def check_token_ids(data_dir, vocab_size):
    """For train.py at start-up: every token id of data_dir inside a model of vocab_size ids, checked from meta.json
    alone, so that a folder of 105B tokens is not read again. Each shard's largest id (recorded at preparation) is
    below meta.json's vocab_size (load_meta), which is its tokenizer's (where that is cheap to know, as are its eot and
    bos), which is at most vocab_size; shards prepared before their largest id was recorded are checked as the loader
    reads them. Raises a UserError that names the file and the fix; returns meta.json's contents."""
    meta = load_meta(data_dir)
    known = known_ids(meta["tokenizer"]) or {}
    for key, value in known.items():  # vocab_size, then the ids of the document prefix, which the Schedule reads
        if meta[key] != value:
            has = (f"{value:,} ids" if key == "vocab_size" else f"end-of-text id {value}" if key == "eot" else
                   "no BOS" if value is None else f"BOS id {value}")
            mine = f"{meta[key]:,}" if key == "vocab_size" else json.dumps(meta[key])
            raise UserError(f"{Path(data_dir) / 'meta.json'}: {key} {mine}, but tokenizer {meta['tokenizer']!r} has "
                            f"{has}: it was edited since preparation; set it back to {json.dumps(value)}, or delete "
                            f"the folder and prepare it again with {prepare_command(meta, data_dir)}")
    if vocab_size < meta["vocab_size"]:
        recorded = [s for s in meta["shards"] if "max_id" in s]
        top = max(recorded, key=lambda s: s["max_id"], default=None)
        holds = f"; {Path(data_dir) / top['file']} holds id {top['max_id']:,}" if top else ""
        raise UserError(f"vocab_size={vocab_size:,} is smaller than the data's vocabulary ({meta['vocab_size']:,} ids, "
                        f"tokenizer {meta['tokenizer']}, in {data_dir}{holds}): use 0 (the data's) or "
                        f"{meta['vocab_size']:,} or more")
    return meta


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
    fix = f"re-run {prepare_command(meta, data_dir)}"
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
    many the split holds; epoch: passes begun after the first, announced on rank 0; meta: the folder's meta.json.
    """

    def __init__(self, data_dir, split, batch_size, *, window, seed=0, rank=0, world_size=1):
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} is not in 0..world_size-1 = 0..{world_size - 1}")
        self.data_dir, self.split, self.batch_size, self.window = Path(data_dir), split, batch_size, window
        self.seed, self.rank, self.world_size = seed, rank, world_size
        self.meta, shards, self._fix = _split_shards(data_dir, split)
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
            _check_ids(tokens, self._files[shard], start, self.meta["vocab_size"], self._fix)
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


if __name__ == "__main__":  # the command line that prepared data before prepare.py had it, kept for users' scripts
    import prepare
    print("note: `python data.py` is now `python prepare.py`, which this runs", flush=True)
    cli.run(prepare.main)
