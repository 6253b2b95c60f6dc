# The paper's 3B dense baseline: the SmolLM3-3B shape (d 2048, 36 layers, 16 heads with 4 KV heads, FFN 11008)
# through Llama-3 code with RoPE on every layer, Llama-3 tokenizer, untied: 3.34B parameters ("3B" is a label).
# DCLM, 20k steps of 2M tokens, lr 2e-4; FSDP2 across the GPUs (the paper used 64 B200s).
from pathlib import Path

exec(Path(__file__).with_name("270m_baseline.py").read_text())
out_dir = "out/3b_baseline"
dim = 2048
n_layers = 36
n_heads = 16
n_kv_heads = 4
ffn_dim = 11008
batch_size = 4
lr = 2e-4
fsdp = True
