# The GPU pair long enough to recover from the switch (config/books_tst.py is the other run): an 8-layer, d 512 model
# (26M non-embedding parameters, GPT-2 tokenizer, untied) on the English books of ../shared/data/corpus (30.6M train
# tokens), 4,000 steps of 16 rows x 1,024 positions = 65.5M positions. The baseline reads 65.5M data tokens (2.1 epochs
# of the books), books_tst.py 81.9M (2.7 epochs). bench/books_pair.sh prepares the data, trains both, scores both on
# the whole validation split and prints the comparison. The data by hand:
#   TIKTOKEN_CACHE_DIR=../shared/data/tiktoken_cache python prepare.py --source '../shared/data/corpus/train.jsonl.xz' \
#       --tokenizer gpt2 --out_dir data/books_gpt2
out_dir = "out/books_baseline"
data_dir = "data/books_gpt2"
data_source = "../shared/data/corpus/train.jsonl.xz"
tokenizer = "gpt2"

vocab_size = 50304  # GPT-2's 50,257 padded to a multiple of 64 for the matmuls
dim = 512
n_layers = 8
n_heads = 8
n_kv_heads = 8
ffn_dim = 1536
max_seq_len = 1024

seq_len = 1024
batch_size = 16
global_batch_tokens = 16384  # one micro-batch per step: many small steps, so that 3,000 follow the switch
max_steps = 4000
lr = 2e-3  # not tuned
warmup_steps = 200
decay_frac = 0.2

eval_interval = 250
eval_tokens = 262144  # 256 rows of the 1.26M-token val split, the same rows at every evaluation
ckpt_interval = 1000
compile = True

s = 1  # the baseline: no superposition phase
r = 0.0
