"""sglang-kvmul: an exact-KV-cache, LMetric-scored data-parallel controller for SGLang.

Layers (ARCHITECTURE.md): `core` (pure decisions, shared with the simulator), `serving` (SGLang
and ZMQ adapters), `launch` (the launcher), `sim` (simulated ranks and workloads), `harness`
(local servers, tiny model, demo) and `cpu_compat` (CPU-only shims).

This file stays import-light: SGLang loads the plugin entry point in every process.
"""

METHOD_NAME = "kvmul"

__all__ = ["METHOD_NAME"]
