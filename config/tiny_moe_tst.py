# A mixture-of-experts TST run small enough for a laptop CPU: bytes of the repository's books (corpus/), 2 layers of
# width 64 with QK-norm, 8 experts of 64 with top-2 (Qwen3-MoE's layout, so tools/export_hf.py exports it), bags of
# s = 4 for the first 30% of 300 steps. Its many small matmuls run best on one thread:
#   OMP_NUM_THREADS=1 python train.py config/tiny_moe_tst.py
out_dir = "out/tiny_moe_tst"
data_dir = "data/books_bytes"
data_source = "books"
tokenizer = "bytes"
vocab_size = 0  # from the data (bytes)

dim = 64
n_layers = 2
n_heads = 4
n_kv_heads = 2
qk_norm = True
max_seq_len = 128
n_experts = 8
top_k = 2
expert_ffn_dim = 64
balance = "aux"
aux_loss_coef = 0.01

seq_len = 128
batch_size = 16
global_batch_tokens = 16 * 128
max_steps = 300
lr = 3e-3
warmup_steps = 30
decay_frac = 0.2
weight_decay = 0.1

s = 4
r = 0.3
tst_mode = "full"
bag_weights = "uniform"

eval_interval = 100
eval_tokens = 16384
fsdp = False
compile = False
