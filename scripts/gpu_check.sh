#!/usr/bin/env bash
# The prepared GPU check: one command that turns a few minutes of one H100/H200 into baselines and
# predicted-vs-measured figures, writing everything to OUT (steps and limits: scripts/gpu_check.py).
#
#   bash scripts/gpu_wheels.sh                 # once, on a machine with a package index: .whl/ (ignored)
#   bash scripts/gpu_check.sh OUT              # on the GPU machine, with .whl/ carried beside the tree
#   bash scripts/gpu_check.sh --dry-run OUT    # anywhere: the same steps on the CPU, CUDA steps skipped
#
# Exit 0 only if every step ran. OUT/summary.txt: each step's status and time, and the predicted-vs-measured
# table; OUT/reports/baselines/<gpu-slug>/: the files to commit as this GPU's baseline.
# Interpreter: $PYTHON, else .venv/bin/python where it exists, else python3 (the GPU machine's, which has torch).
# Settings: GPU_CHECK_WHEELS (default .whl), GPU_CHECK_SITE (install target, default $TMPDIR/stbench-gpu-site),
# GPU_CHECK_HARDWARE (hardware table name when the GPU's name matches none), GPU_CHECK_DEADLINE_S (default 570).
set -euo pipefail
repo=$(cd "$(dirname "$0")/.." && pwd)
if [ -z "${PYTHON:-}" ]; then
    if [ -x "$repo/.venv/bin/python" ]; then PYTHON=$repo/.venv/bin/python; else PYTHON=python3; fi
fi
export PYTHON
exec "$PYTHON" "$repo/scripts/gpu_check.py" "$@"
