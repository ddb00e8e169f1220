"""sglang-kvmul: an exact-KV-cache, LMetric-scored data-parallel controller for SGLang.

Layers, bottom up (each module holds one thing):
  policy, prefix, mirror, load_ledger, router   pure decision code, no I/O (shared with the simulator)
  kv_events, controller, plugin                 ZMQ / SGLang adapters
  launch_args, launch_server, local_server      launching a server
  tiny_model, demo                              the built-in CPU demo
  cpu_compat/                                   CPU-only compatibility shims for SGLang 0.5.23

This file stays import-light: SGLang loads the plugin entry point in every process.
"""

METHOD_NAME = "kvmul"
SGLANG_VERSION = "0.5.23"

__all__ = ["METHOD_NAME", "SGLANG_VERSION"]
