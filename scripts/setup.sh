#!/usr/bin/env bash
# Create .venv (seeing the system's packages, so a GPU machine's own torch is kept) and install stbench.
# torch: where none is importable, install the CPU wheel torch==2.13.0 first, so that pip never pulls
# several GB of CUDA packages for the unpinned `torch` requirement; where one is installed, leave it alone.
set -euo pipefail
cd "$(dirname "$0")/.."
if [ ! -x .venv/bin/python ]; then
    python3 -m venv --system-site-packages .venv
fi
py=.venv/bin/python
if ! "$py" -c "import torch" 2>/dev/null; then
    "$py" -m pip install -q torch==2.13.0
fi
"$py" -m pip install -q -e ".[test]"
"$py" -c "import torch, diffusers, stbench; print(f'stbench ready: torch {torch.__version__}, diffusers {diffusers.__version__}, cuda {torch.cuda.is_available()}')"
