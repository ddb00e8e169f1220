#!/usr/bin/env bash
# Two nodes, 8 GPUs each: attention DP over 16 ranks for an MoE model, kvmul over every rank of both
# nodes. The same command on every node, only NODE_RANK differing; each node's KV events bind on its
# own address (the one that routes to DIST_INIT_ADDR) on ports derived from DIST_INIT_ADDR's port,
# readable only by node 0, whose controller learns the other nodes' addresses when they register.
#   MODEL=Qwen/Qwen3-30B-A3B DIST_INIT_ADDR=10.0.0.1:25000 NODE_RANK=0 launch/gpu-2node-attn-dp.sh
set -euo pipefail
. "$(dirname "$0")/common.sh"
run python -m sglang_kvmul.launch_server \
  --model-path "${MODEL:-Qwen/Qwen3-30B-A3B}" \
  --host "${HOST:-127.0.0.1}" --port "${PORT:-30000}" \
  --tp-size 16 --attn-dp-size 16 \
  --nnodes 2 --node-rank "${NODE_RANK:?set NODE_RANK to 0 or 1}" \
  --dist-init-addr "${DIST_INIT_ADDR:?set DIST_INIT_ADDR to the address:port of node 0}" \
  --attention-backend flashinfer \
  --page-size 16 \
  --load-snapshot-publish-interval 1 \
  --enable-metrics \
  --kvmul-metrics-port "${KVMUL_METRICS_PORT:-30100}" \
  "$@"
