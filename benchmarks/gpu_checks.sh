#!/usr/bin/env bash
# The checks of issue #13 point 4 that need CUDA: DDP and FSDP with nccl on 2 GPUs (one per rank) train the
# one-GPU adapter (tests marked `gpu` in tests/runtime/test_distributed.py; skipped with fewer than 2 devices).
# The CPU versions (gloo) run in the normal suite. Run from anywhere:  benchmarks/gpu_checks.sh
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-.venv/bin/python}
export DO_NOT_TRACK=1 HF_HUB_DISABLE_TELEMETRY=1 MLFLOW_DISABLE_TELEMETRY=true PREFECT_SERVER_ANALYTICS_ENABLED=false
"$PYTHON" -c "import torch; print(torch.__version__, 'CUDA devices:', torch.cuda.device_count())"
timeout 900 "$PYTHON" -m pytest -q -rs -m gpu tests/runtime/test_distributed.py
