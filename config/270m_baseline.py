# The paper's 270M dense baseline (docs/METHOD.md): the SmolLM2-135M shape through Llama-3 code with the Llama-3
# tokenizer (128,256 ids) and an untied LM head, full multi-head attention (that is what lands on 270M);
# DCLM; 20k steps of 2M tokens; AdamW (0.9, 0.95); WSD with 2000 warm-up steps and a 10% decay; lr 2e-3.
# Prepare the data first (README, "Data"), then: torchrun --nproc_per_node=8 train.py -- config/270m_baseline.py
out_dir = "out/270m_baseline"
data_dir = "data/dclm_llama3"
data_source = "dclm"
tokenizer = "llama3:tokenizer.model"  # Meta's original tokenizer.model

vocab_size = 128256
dim = 576
n_layers = 30
n_heads = 9
n_kv_heads = 9
ffn_dim = 1536
rope_theta = 500000.0
max_seq_len = 2048

seq_len = 2048
batch_size = 16  # rows per GPU per micro-step (tools/plan.py estimates the memory); accumulation fills the 2M-token batch
global_batch_tokens = 2097152  # 1024 rows of 2048 positions
max_steps = 20000
lr = 2e-3
warmup_steps = 2000
decay_frac = 0.1
weight_decay = 0.1
grad_clip = 1.0

eval_interval = 500
eval_tokens = 2**20
ckpt_interval = 1000
compile = True

