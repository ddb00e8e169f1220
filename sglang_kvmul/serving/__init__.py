"""The live layer: SGLang's DP controller with kvmul, its KV-event streams, metrics and plugin hook.

Import-free on purpose: SGLang loads the plugin entry point in every process it starts.
"""
