#!/usr/bin/env bash
# longtune vs transformers on one CUDA GPU (issue 8's numbers), in under 6 minutes on an
# H100/H200; installs and downloads nothing. `--quick`: the same code on CPU with a tiny model.
#
#   benchmarks/gpu.sh                     # results also in $OUT/gpu_bench.txt (or ./gpu_bench.txt)
#   benchmarks/gpu.sh --only table mfu    # some sections (table mfu attention longest train plan offload)
#   benchmarks/gpu.sh --quick             # CPU smoke run (the test suite runs it)
#
# PYTHON selects the interpreter (default: python3 on PATH).
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
export PYTHONPATH="$root${PYTHONPATH:+:$PYTHONPATH}"
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 TOKENIZERS_PARALLELISM=false
exec "${PYTHON:-python3}" "$root/benchmarks/gpu_bench.py" "$@"
