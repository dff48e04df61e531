#!/usr/bin/env bash
# Every GPU check in one go, on a CUDA machine: the gpu-marked tests, then each benchmark on CUDA.
#   bash benchmarks/gpu_suite.sh [LOG_DIR]
# Results land in benchmarks/results/*_cuda.json; logs in LOG_DIR (default build/gpu).
set -uo pipefail
PY=${PYTHON:-python3}
LOG=${1:-build/gpu}
mkdir -p "$LOG"
export PYTHONUNBUFFERED=1
nvidia-smi -L || true
$PY -c "import torch, monai; print('torch', torch.__version__, 'monai', monai.__version__, 'cuda', torch.cuda.is_available())"
status=0
step() { echo "== $*"; "$@" 2>&1 | tee -a "$LOG/suite.log"; [ "${PIPESTATUS[0]}" -eq 0 ] || status=1; }
step $PY -m pytest -q -m gpu tests/test_gpu.py -p no:cacheprovider
step $PY benchmarks/train_throughput.py --device cuda --size 64 --steps 30
step $PY benchmarks/train_throughput.py --device cuda --size 224 --steps 20
step $PY benchmarks/batch.py --device cuda
step $PY benchmarks/serve_load.py --device cuda
step $PY benchmarks/scaling.py
exit $status
