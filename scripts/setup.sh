#!/usr/bin/env bash
# Idempotent setup of a project-local virtualenv (.venv) with SGLang 0.5.23 and this package.
#   CPU (no CUDA): the measured minimal recipe: torch 2.13.0 CPU, curated requirements,
#                  sglang --no-deps, and the CPU compatibility fixes in sglang_kvmul/cpu_compat.
#   GPU:           plain `pip install sglang==0.5.23` (brings FlashInfer).
# Usage: scripts/setup.sh [auto|cpu|gpu]     (auto: gpu if nvidia-smi sees a GPU)
set -euo pipefail
cd "$(dirname "$0")/.."

MODE="${1:-auto}"
if [ "$MODE" = auto ]; then
  if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; then MODE=gpu; else MODE=cpu; fi
fi
VENV="${VENV:-.venv}"
PYTHON="${PYTHON:-python3}"

step() { printf '\n[setup %s] %s\n' "$(date +%H:%M:%S)" "$*"; }
pipi() {  # quiet pip install that still fails loudly, with the full log
  local log; log="$(mktemp)"
  if ! "$VENV/bin/python" -m pip install --disable-pip-version-check --progress-bar off "$@" >"$log" 2>&1; then
    cat "$log" >&2; rm -f "$log"; echo "setup: pip install $* FAILED" >&2; return 1
  fi
  grep -E '^Successfully installed' "$log" | cut -c1-400 || true
  rm -f "$log"
}

if [ ! -x "$VENV/bin/python" ]; then
  step "creating $VENV"
  "$PYTHON" -m venv "$VENV"
fi

STAMP="$VENV/.sglang-kvmul-$MODE-$(cat requirements/*.txt scripts/setup.sh | sha256sum | cut -c1-16)"
if [ ! -f "$STAMP" ]; then
  if [ "$MODE" = cpu ]; then
    step "torch 2.13.0 (CPU build)"
    pipi torch==2.13.0
    step "SGLang's runtime requirements for CPU (requirements/sglang-cpu.txt)"
    pipi -r requirements/sglang-cpu.txt
    step "sglang==0.5.23 (--no-deps)"
    pipi --no-deps sglang==0.5.23
    step "CPU compatibility: torchvision fix"
    "$VENV/bin/python" sglang_kvmul/cpu_compat/fix_torchvision.py
  else
    step "sglang==0.5.23 (GPU, with FlashInfer)"
    pipi sglang==0.5.23
  fi
  step "dev tools (requirements/dev.txt)"
  pipi -r requirements/dev.txt
  # Dynamo's Rust radix indexer, the reference in benchmarks/decision_latency.py. Without its
  # deps: it pins pydantic<=2.13.5, SGLang needs newer, and its RadixTree uses neither.
  step "ai-dynamo-runtime (benchmark reference, --no-deps)"
  pipi --no-deps ai-dynamo-runtime==1.6.1
  touch "$STAMP"
else
  step "dependencies already installed ($STAMP)"
fi
step "sglang-kvmul (editable)"
pipi --no-deps -e .
"$VENV/bin/python" -c "import sglang, sglang_kvmul; print('sglang', sglang.__version__, '| sglang_kvmul ok')"
