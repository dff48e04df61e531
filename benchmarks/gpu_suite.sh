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
# the INT8 gate at 224 px on a fully trained model (the CPU record, int8_gate_real_224.json, is a short 64 px
# training fine-tuned briefly at 224 px):
# DenseNet121 trained on CUDA at 224 px on the real dev set (split seed 0), then quantized and gated on this CPU
step $PY benchmarks/int8_gate.py --data "${HAM_DEV:-../shared/data/ham10000-dev}" --size 224 --epochs 90 \
  --threads 0 --precision auto --work "$LOG/int8_gate" --out int8_gate_real_224_gpu_trained
exit $status
