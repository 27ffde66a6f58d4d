#!/usr/bin/env bash
# The GPU benchmark (bench/gpu.py) on one CUDA GPU, killed at 6 minutes (it stops itself at
# 330 s); installs nothing and needs no Ray.
set -euo pipefail
cd "$(dirname "$0")/.."
python=python
if [ -x .venv/bin/python ]; then python=.venv/bin/python; fi
timeout 360 "$python" bench/gpu.py --out bench/results/gpu.json "$@"
