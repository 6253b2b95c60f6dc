# The paper's 10B-A1B MoE baseline: 125k steps of ordinary next-token training, 8M-token batches (1.05T tokens).
#   torchrun --nproc_per_node=8 train.py -- config/10b_a1b_baseline.py
# Shape (model.NAMED_SHAPES["10b-a1b"]): Qwen3-MoE style, 48 layers of width 1024, 8 query heads of 128 with 2
# KV heads and QK-norm, 128 experts of 512 per layer, top-8, no shared expert, Llama-3 vocabulary, untied:
# 10,058,576,896 parameters in total, 998,880,256 active per position (tests/test_moe.py checks both).
out_dir = "out/10b_a1b_baseline"
# Data: 50/50 DCLM and FineWeb-Edu (the paper's MoE mix) with Llama 3 tokens; prepare it first (README, "Data").
data_dir = "data/dclm_fwedu_llama3"
data_source = "0.5*dclm,0.5*fineweb-edu"
tokenizer = "llama3:tokenizer.model"  # Meta's original tokenizer.model
vocab_size = 128_256

dim = 1024
n_layers = 48
n_heads = 8
n_kv_heads = 2
qk_norm = True
max_seq_len = 4096
n_experts = 128
top_k = 8
expert_ffn_dim = 512
balance = "aux"  # Qwen3's global-batch load-balancing loss; "bias" = torchtitan's aux-loss-free balancing
aux_loss_coef = 0.001

seq_len = 4096
batch_size = 2  # rows per GPU per micro-step; gradient accumulation fills the global batch
global_batch_tokens = 8 * 2**20  # 8,388,608 positions = 2,048 rows of 4,096
max_steps = 125_000
lr = 3e-4
warmup_steps = 2000
decay_frac = 0.1
weight_decay = 0.1

eval_interval = 1000
eval_tokens = 2**20
fsdp = True
compile = True
