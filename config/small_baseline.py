# A single-GPU pair for people without a cluster: an 8-layer, d 512 model (26M non-embedding parameters,
# GPT-2 tokenizer) on FineWeb-Edu, 4000 steps of 262k positions (~1B positions, ~4e17 FLOPs: well under half
# an hour on one H100/H200 each). Prepare the data first:
#   python prepare.py --source fineweb-edu:sample-10BT --tokenizer gpt2 --out_dir data/fwedu_gpt2 --max_tokens 3e9
out_dir = "out/small_baseline"
data_dir = "data/fwedu_gpt2"
data_source = "fineweb-edu:sample-10BT"
tokenizer = "gpt2"

vocab_size = 50304  # GPT-2's 50,257 padded to a multiple of 64 for the matmuls
dim = 512
n_layers = 8
n_heads = 8
n_kv_heads = 8
ffn_dim = 1536
max_seq_len = 1024

seq_len = 1024
batch_size = 32
global_batch_tokens = 262144
max_steps = 4000
lr = 3e-3
warmup_steps = 200
decay_frac = 0.1

eval_interval = 200
eval_tokens = 2**19
ckpt_interval = 1000
compile = True

