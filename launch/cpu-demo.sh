#!/usr/bin/env bash
# Single node, CPU only: dp=2 on the built-in tiny model (dummy weights), one core per rank.
#   PORT=30000 launch/cpu-demo.sh [extra sglang flags]
set -euo pipefail
. "$(dirname "$0")/common.sh"
MODEL="${MODEL:-$(python -m sglang_kvmul.harness.tiny_model tiny)}"
run python -m sglang_kvmul.launch_server \
  --model-path "$MODEL" \
  --host "${HOST:-127.0.0.1}" --port "${PORT:-30000}" \
  --dp-size 2 \
  --device cpu --load-format dummy \
  --max-total-tokens 16384 \
  --sleep-on-idle --skip-server-warmup \
  --kvmul-metrics-port "${KVMUL_METRICS_PORT:-30100}" \
  "$@"
