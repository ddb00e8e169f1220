"""`python -m sglang_kvmul.launch_server`: `sglang.launch_server` with the kvmul controller.

Every `sglang.launch_server` flag works unchanged; see `launch_args` for the defaults added. Own
flags: `--kvmul-metrics-port P` (Prometheus metrics of the controller; `--kvmul-metrics-host`,
default 127.0.0.1) and `--kvmul-policy NAME` (a baseline rule on the same exact inputs, for
comparisons: cache_only, load_only, vllm_v1, linear:<alpha>, dynamo, sglang_cache_aware).
With `--device cpu`, the CPU compatibility environment is set up first.
"""

from __future__ import annotations

import os
import sys


def _cuda_available() -> bool:
    try:
        import torch

        return bool(torch.cuda.is_available())
    except Exception:
        return False


def prepare(argv: list[str]) -> list[str]:
    """Final argv, with the process environment prepared for it (before SGLang is imported)."""
    from sglang_kvmul.launch.args import (
        device_of,
        kv_events_config_of,
        scheduler_processes,
        split_own_flags,
        with_kvmul_defaults,
    )
    from sglang_kvmul.launch.ports import free_port_range, port_is_free

    cuda = _cuda_available()
    try:
        argv, settings = split_own_flags(argv)
    except ValueError as exc:
        raise SystemExit(f"sglang_kvmul.launch_server: {exc}") from None
    own_ports = set()
    if settings.metrics_port is not None:
        if not port_is_free(settings.metrics_port, settings.metrics_host):
            raise SystemExit(
                f"sglang_kvmul.launch_server: --kvmul-metrics-port {settings.metrics_port} is already in use on "
                f"{settings.metrics_host}; choose a free port"
            )
        own_ports.add(settings.metrics_port)
    ours = kv_events_config_of(argv) is None
    argv = with_kvmul_defaults(argv, cuda=cuda, free_port_range=free_port_range, avoid=own_ports)
    if ours and kv_events_config_of(argv) is not None and settings.event_peers is None:
        settings = settings.replace(event_peers="127.0.0.1")  # events we configured: the controller only
    os.environ.update(settings.to_env())
    if device_of(argv, cuda) == "cpu":
        from sglang_kvmul.cpu_compat import cpu_env

        env = cpu_env(scheduler_processes(argv))
        os.environ.update(env)
        if "PYTHONPATH" in env:  # the spawned children read PYTHONPATH; this process needs sys.path
            sys.path[:0] = [p for p in env["PYTHONPATH"].split(os.pathsep) if p not in sys.path]
    return argv


def main(argv: list[str] | None = None) -> None:
    argv = prepare(list(sys.argv[1:] if argv is None else argv))

    from sglang.launch_server import run_server
    from sglang.srt.plugins import load_plugins
    from sglang.srt.server_args import prepare_server_args
    from sglang.srt.utils import kill_process_tree

    load_plugins()
    server_args = prepare_server_args(argv)
    try:
        run_server(server_args)
    finally:
        kill_process_tree(os.getpid(), include_parent=False)


if __name__ == "__main__":
    main()
