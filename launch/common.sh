# Shared by the recipes: run the final command, or print it when KVMUL_DRY_RUN=1 (used by tests).
run() {
  if [ "${KVMUL_DRY_RUN:-0}" = 1 ]; then printf '%s\n' "$@"; else exec "$@"; fi
}
