#!/usr/bin/env bash
# The GPU measurements the README's performance table lacks, in one prepared command for a machine with one
# GPU (about 5 minutes on one; most of it is torch.compile): at the paper's config (R-50 L1 H2048 at 224,
# batch 32, bf16 autocast, compiled, channels-last) the training step's img/s, MFU and peak memory on synthetic
# batches and fed by the real data path (640x480 JPEGs decoded and augmented by DataLoader workers, so the
# pipeline's ceiling shows), one data worker's img/s, beam-search captions/s, the VOC07-sized SVMs on the GPU,
# and train.py under a 1-process torchrun (NCCL, compile). Prints one table (bench.py's).
#
#   bash dev/gpu_check.sh                 # then copy the table into the README's Performance section
set -euo pipefail
cd "$(dirname "$0")/.."
python -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 'error: no CUDA GPU here')"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || true
python bench.py --device=cuda --models=paper --stages=train,train_data,data,caption,svm,torchrun \
    --data_workers="$(python -c 'import os; print(min(16, os.cpu_count()))')" "$@"
