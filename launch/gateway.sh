#!/usr/bin/env bash
# Several kvmul servers behind the SGLang gateway (sglang-router): the gateway picks the server
# (cache_aware), each server's kvmul controller picks the rank with exact cache figures. Start the
# servers first (e.g. launch/gpu-1node-8gpu.sh on each node), then:
#   WORKER_URLS="http://10.0.0.1:30000 http://10.0.0.2:30000" PORT=8000 launch/gateway.sh [router flags]
# Leave out --dp-aware: with it the gateway picks the rank itself and bypasses kvmul.
set -euo pipefail
. "$(dirname "$0")/common.sh"
# shellcheck disable=SC2086  # WORKER_URLS is a space-separated list of URLs
run python -m sglang_router.launch_router \
  --host "${HOST:-127.0.0.1}" --port "${PORT:-8000}" \
  --policy cache_aware \
  --worker-urls ${WORKER_URLS:?set WORKER_URLS to the kvmul servers} \
  "$@"
