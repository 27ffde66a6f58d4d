#!/usr/bin/env bash
# The GPU benchmark (bench/gpu.py) on one CUDA GPU, killed at 7 minutes (it stops itself at
# 330 s, plus 40 s for each --real-model folder); installs nothing and needs no Ray.
set -euo pipefail
cd "$(dirname "$0")/.."
python=python
if [ -x .venv/bin/python ]; then python=.venv/bin/python; fi
timeout 420 "$python" bench/gpu.py --out bench/results/gpu.json "$@"
