#!/usr/bin/env bash
# Single node, 8 GPUs: dp=8 under the kvmul controller, FlashInfer attention, KV events on
# loopback (configured by the launcher), SGLang metrics and the controller's own metrics on.
#   MODEL=Qwen/Qwen2.5-7B-Instruct PORT=30000 launch/gpu-1node-8gpu.sh [extra sglang flags]
set -euo pipefail
. "$(dirname "$0")/common.sh"
run python -m sglang_kvmul.launch_server \
  --model-path "${MODEL:-Qwen/Qwen2.5-7B-Instruct}" \
  --host "${HOST:-127.0.0.1}" --port "${PORT:-30000}" \
  --dp-size 8 \
  --attention-backend flashinfer \
  --page-size 16 \
  --load-snapshot-publish-interval 1 \
  --enable-metrics \
  --kvmul-metrics-port "${KVMUL_METRICS_PORT:-30100}" \
  "$@"
