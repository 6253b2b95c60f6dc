#!/usr/bin/env bash
# The GPU pair config/books_baseline.py + config/books_tst.py: prepares the English books in data/books_gpt2 if they
# are missing, trains the baseline and the TST run one after another (about 4 minutes each on one H100), scores both
# on the whole validation split and prints the comparison (runs/books/summary.md). Run again, it resumes or just
# prints. Arguments go to tools/compare.py sweep, e.g. a CPU smoke test:
#   bash bench/books_pair.sh --out_root /tmp/books --set max_steps=8 dim=64 n_layers=2 compile=False ...
set -euo pipefail
cd "$(dirname "$0")/.."
shared=${TST_SHARED_DATA:-../shared/data}
export TIKTOKEN_CACHE_DIR=${TIKTOKEN_CACHE_DIR:-$shared/tiktoken_cache}
if [ ! -f data/books_gpt2/meta.json ]; then
    python prepare.py --source "$shared/corpus/train.jsonl.xz" --tokenizer gpt2 --out_dir data/books_gpt2
fi
# s and r as in config/books_tst.py; the sweep's baseline is that config with s=1, r=0: books_baseline.py
python tools/compare.py sweep --config config/books_tst.py --s 2 --r 0.25 --out_root runs/books --full_split_eval "$@"
