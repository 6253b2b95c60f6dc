#!/usr/bin/env bash
# Every GPU figure the README quotes, in one call on one GPU (about 6-8 minutes with compilation; not yet run: see the
# README). Writes each benchmark's JSON and the summary, gpu.json and gpu.md, into OUT (default bench/out).
#   bash bench/gpu.sh [OUT]
# 1. the 270M baseline step and phase-1 step (s = 6), compiled, bf16: ms, positions/s, MFU, peak memory
# 2. the 10B-A1B MoE, a 6-layer slice, the same two steps
# 3. LM head + loss at 8 x 2048 positions, V = 128,256, bf16: whole logits vs the chunked path training runs
# 4. MCE against one cross-entropy over the same logits at s = 1, 4, 8, 16
set -euo pipefail
cd "$(dirname "$0")/.."
out=${1:-bench/out}
mkdir -p "$out"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$out/gpu.txt"
python -c "import torch; print('torch', torch.__version__, 'cuda', torch.version.cuda)" | tee -a "$out/gpu.txt"
python bench/step.py config/270m_tst.py --batch_size 8 --json "$out/step_270m.json"
python bench/step.py config/10b_a1b_tst.py --n_layers 6 --batch_size 2 --json "$out/step_10b_a1b_6layers.json"
python bench/mce.py --head --positions 16384 --dim 576 --dtype bfloat16 --s 1 6 --repeats 5 --json "$out/head.json"
python bench/mce.py --positions 8192 --dtype bfloat16 --s 1 4 8 16 --repeats 7 --json "$out/mce.json"
python bench/gpu_summary.py "$out"
