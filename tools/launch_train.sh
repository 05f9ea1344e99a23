#!/usr/bin/env bash
# Run train_ddps.py with the given arguments: one process, or NPROC processes through torchrun.
# Shared by job_train_base.sh and job_train_ddps.sh. PYTHON picks the interpreter (default: the
# project's .venv if there is one).
set -euo pipefail
cd "$(dirname "$0")/.."
NPROC=${NPROC:-1}
PY=${PYTHON:-$( [ -x .venv/bin/python ] && echo .venv/bin/python || echo python )}
if [ "$NPROC" -gt 1 ]; then
  exec "$PY" -m torch.distributed.run --standalone --nproc_per_node "$NPROC" train_ddps.py "$@"
fi
exec "$PY" train_ddps.py "$@"
