#!/usr/bin/env bash
# Everything a lent GPU machine should run, in a few minutes: the CUDA tests, then the GPU benchmark.
#   bash bench/gpu_check.sh [OUT_DIR]        (default bench/)
set -uo pipefail
cd "$(dirname "$0")/.."
out=${1:-bench}
python3 -m pytest tests -m cuda -q -p no:cacheprovider 2>&1 | tee "$out/cuda_tests.log"
gpus=$(python3 -c "import torch; print(torch.cuda.device_count())")
python3 -m torch.distributed.run --standalone --nproc-per-node "$gpus" bench/bench_gpu.py --steps 6 \
    --output "$out/RESULTS_gpu.md" 2>&1 | tee "$out/bench_gpu.log"
