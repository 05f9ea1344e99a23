#!/usr/bin/env bash
# Create ./.venv (if missing) and install the pinned requirements into it. Idempotent: a second
# run only checks that everything is there. Used by the README's commands and by .ci/run.
set -euo pipefail
cd "$(dirname "$0")/.."
if [ ! -x .venv/bin/python ]; then
  python3 -m venv .venv
fi
.venv/bin/pip install -q --disable-pip-version-check -r requirements.txt -r requirements-test.txt
