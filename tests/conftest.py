import json
import os
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

# Offline assets (tokenizers, corpus, eval sets) live beside the checkout in ../shared/data.
# Tests that need them skip on a fresh clone without it.
SHARED_DATA = Path(os.environ.get("TST_SHARED_DATA", ROOT.parent / "shared" / "data"))


@pytest.fixture
def shared_data():
    if not SHARED_DATA.is_dir():
        pytest.skip(f"needs the offline assets in {SHARED_DATA} (set TST_SHARED_DATA)")
    return SHARED_DATA


@pytest.fixture(scope="session")
def data_dir(tmp_path_factory):
    """A small byte-level corpus made here, for the training tests: text files -> shards."""
    import prepare
    folder = tmp_path_factory.mktemp("corpus")
    for i in range(40):
        words = " ".join(f"w{(i * 7 + k * k) % 53}" for k in range(400))
        (folder / f"doc{i:02d}.txt").write_text(f"document {i}: {words}\n")
    out = folder / "shards"
    prepare.prepare(str(folder / "*.txt"), "bytes", out, val_tokens=4000, num_proc=1)
    return out


def settings(data_dir, out_dir, **overrides):
    """train.py's command line for a tiny run on data_dir (2 layers of width 32, 10 steps, s = 4 for the first 3)."""
    base = dict(data_dir=data_dir, out_dir=out_dir, dim=32, n_layers=2, n_heads=2, n_kv_heads=2, ffn_dim=64,
                max_seq_len=16, seq_len=16, batch_size=4, max_steps=10, warmup_steps=2, lr=1e-2, s=4, r=0.3,
                eval_interval=5, eval_tokens=128, log_interval=100, ckpt_interval=1, keep_last=20, device="cpu")
    base.update(overrides)
    return [f"--{k}={v}" for k, v in base.items()]


def read_log(out_dir):
    return [json.loads(line) for line in (Path(out_dir) / "log.jsonl").read_text().splitlines()]
