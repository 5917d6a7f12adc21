#!/usr/bin/env bash
# Run on a lent GPU machine (jax with CUDA preinstalled, no network): correctness and
# throughput of attention and decode in well under 5 minutes.
set -euo pipefail
cd "$(dirname "$0")/.."
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
python3 -c "import gguf, tokenizers, yaml" 2>/dev/null || \
  echo "note: gguf/tokenizers/pyyaml missing; the decode rows need them" >&2
export PYTHONPATH="$PWD/benchmarks:$PYTHONPATH"
export PYTHONUNBUFFERED=1
timeout 290 python3 benchmarks/gpu_check.py "$@"
