"""Discrete-event simulator of SGLang DP ranks driven by the production router (work in progress).

The router in the simulation is `sglang_kvmul.core.router.KvmulRouter` with the rules of
`sglang_kvmul.core.rules`, fed the simulated ranks' KV events and load snapshots: no second
implementation of any policy or of the cache mirror.
"""
