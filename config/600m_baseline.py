# The paper's 600M dense baseline: the SmolLM2-360M shape through Llama-3 code, Llama-3 tokenizer, untied,
# full multi-head attention (600M; SmolLM2's 5 KV heads would count 561M). DCLM, 20k steps of 2M tokens, lr 1e-3.
from pathlib import Path

exec(Path(__file__).with_name("270m_baseline.py").read_text())
out_dir = "out/600m_baseline"
dim = 960
n_layers = 32
n_heads = 15
n_kv_heads = 15
ffn_dim = 2560
batch_size = 8  # rows per GPU per micro-step (tools/plan.py estimates the memory)
lr = 1e-3
