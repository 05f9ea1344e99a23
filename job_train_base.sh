#!/usr/bin/env bash
# Train the ResNet-50 teacher (single model). CUHK-SYSU by default; PRW with DATASET=prw.
#   bash job_train_base.sh                       # CUHK-SYSU, GPU chosen by CUDA_VISIBLE_DEVICES
#   DATASET=prw bash job_train_base.sh           # PRW
#   CUDA_VISIBLE_DEVICES=1 bash job_train_base.sh
#   NPROC=4 bash job_train_base.sh               # 4 GPUs with torchrun (global batch = 4 x batch)
# Extra arguments are passed on as KEY VALUE config overrides, e.g. SOLVER.MAX_EPOCHS 10.
set -euo pipefail
cd "$(dirname "$0")"
DATASET=${DATASET:-cuhk_sysu}
BACKBONE=${BACKBONE:-resnet50}
exec bash tools/launch_train.sh --cfg "configs/${DATASET}/${BACKBONE}/base.yaml" "$@"
