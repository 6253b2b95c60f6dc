# The tiny offline baseline: a 4-layer byte-level model on the bytes of 29 public-domain books (corpus/).
# About 9 minutes on a 2-core CPU; nothing is downloaded (train.py prepares data/books_bytes on first use).
out_dir = "out/tiny_baseline"
data_dir = "data/books_bytes"
data_source = "books"
tokenizer = "bytes"

dim = 128
n_layers = 4
n_heads = 4
n_kv_heads = 4
ffn_dim = 512
max_seq_len = 128

seq_len = 128
batch_size = 16
max_steps = 3000
lr = 3e-3
warmup_steps = 30
decay_frac = 0.1

eval_interval = 200
eval_tokens = 65536  # 512 rows of 128 of the 1.0M-token val split
