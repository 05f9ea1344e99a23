#!/usr/bin/env bash
# Distill a student from the trained ResNet-50 teacher with DDPS (DFD + LD + CD).
# Train the teacher first (job_train_base.sh); its last checkpoint is the config's
# DISTILLER.TEACHER.CKPT (./exp/<dataset>/resnet50_base/epoch_19.pth), or pass TEACHER=path.
#   bash job_train_ddps.sh                                  # CUHK-SYSU, ResNet-18 student
#   STUDENT=resnet18x05 bash job_train_ddps.sh              # ResNet-18 at half width
#   STUDENT=mobilenetV2 bash job_train_ddps.sh              # MobileNetV2 (PRW: mobilenetv2)
#   DATASET=prw bash job_train_ddps.sh                      # PRW
#   TEACHER=/path/epoch_19.pth NPROC=2 bash job_train_ddps.sh
set -euo pipefail
cd "$(dirname "$0")"
DATASET=${DATASET:-cuhk_sysu}
STUDENT=${STUDENT:-resnet18}
EXTRA=()
if [ -n "${TEACHER:-}" ]; then
  EXTRA=(DISTILLER.TEACHER.CKPT "$TEACHER")
fi
exec bash tools/launch_train.sh --cfg "configs/${DATASET}/${STUDENT}/ddps.yaml" "${EXTRA[@]}" "$@"
