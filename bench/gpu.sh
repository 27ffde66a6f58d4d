#!/usr/bin/env bash
# The GPU benchmark (bench/gpu.py) on one CUDA GPU, killed at 8 minutes; installs nothing.
set -euo pipefail
cd "$(dirname "$0")/.."
python=python
if [ -x .venv/bin/python ]; then python=.venv/bin/python; fi
timeout 480 "$python" bench/gpu.py --out bench/results/gpu.json "$@"
