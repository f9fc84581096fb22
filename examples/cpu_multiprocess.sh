#!/usr/bin/env bash
# Pretrain the tiny Emu on 4 CPU processes (gloo): TP2 x PP2, 1F1B, a few steps.
# The same command runs on GPUs (NCCL is picked from the device). Takes ~1-2 min on 2 cores.
set -euo pipefail
cd "$(dirname "$0")/.."
export OMP_NUM_THREADS=1  # 4 ranks share the cores
torchrun --standalone --nproc-per-node 4 pretrain_emu.py \
  --preset tiny --device cpu \
  --tensor-model-parallel-size 2 --pipeline-model-parallel-size 2 --pipeline-schedule 1f1b \
  --micro-batch-size 2 --global-batch-size 4 --seq-length 160 \
  --train-iters "${TRAIN_ITERS:-6}" --log-interval 2 --num-workers 0 "$@"
