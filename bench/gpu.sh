#!/usr/bin/env bash
# The GPU figures in one command, on a machine with an NVIDIA GPU (driver, CUDA 12 cuBLAS):
# builds a Llama-2-7B-shape model (random weights), calibrates the worker on the GPU, and prints
# raw and system tokens/s at batch sizes 1-128, GPU memory, and batch-1 decode as a share of the
# GPU's measured memory bandwidth. See bench/gpu.py.
#   bench/gpu.sh [--device-index N] [--sizes 1,2,4,8,16,32,64,128]
set -euo pipefail
cd "$(dirname "$0")/.."
command -v nvidia-smi >/dev/null || { echo "bench/gpu.sh: no nvidia-smi: this needs an NVIDIA GPU" >&2; exit 2; }
make install >/dev/null
# CTranslate2's CUDA build needs cuBLAS 12 next to the driver.
.venv/bin/python -c "import nvidia.cublas" 2>/dev/null || .venv/bin/python -m pip install --quiet nvidia-cublas-cu12
export LD_LIBRARY_PATH="$(.venv/bin/python -c 'import nvidia.cublas, os; print(os.path.join(nvidia.cublas.__path__[0], "lib"))'):${LD_LIBRARY_PATH:-}"
exec .venv/bin/python -m bench.gpu "$@"
