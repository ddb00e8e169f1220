"""`python -m sglang_kvmul.launch_server`: `sglang.launch_server` with the kvmul controller.

Every `sglang.launch_server` flag works unchanged; see `launch_args` for the defaults added. Own
flags: `--kvmul-metrics-port P` (Prometheus metrics of the controller; `--kvmul-metrics-host`,
default 127.0.0.1) and `--kvmul-policy NAME` (the routing rule; default `marginal_behind_held`; `kvmul`
is the paper's product; baselines on the same exact inputs, for comparisons: cache_only,
load_only, vllm_v1, linear:<alpha>, dynamo, sglang_cache_aware; all in `core.rules.REGISTRY`).
With `--device cpu`, the CPU compatibility environment is set up first. With kvmul, `/health` and
`/health_generate` answer 503 naming the ranks while a DP rank is down (`serving.health`).
"""

from __future__ import annotations

import os
import shutil
import sys
import tempfile


def _cuda_available() -> bool:
    try:
        import torch

        return bool(torch.cuda.is_available())
    except Exception:
        return False


def prepare(argv: list[str]) -> list[str]:
    """Final argv, with the process environment prepared for it (before SGLang is imported)."""
    from sglang_kvmul.launch.args import (
        cluster_of,
        device_of,
        host_of,
        kv_events_config_of,
        scheduler_processes,
        split_own_flags,
        with_kvmul_defaults,
    )
    from sglang_kvmul.launch.ports import free_port_range, port_is_free
    from sglang_kvmul.serving.event_registration import node_address

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
    cluster = cluster_of(argv)
    node_addr = None
    if cluster is not None:
        node_addr = settings.node_addr or node_address(host_of(argv), cluster.dist_host)
        settings = settings.replace(node_addr=node_addr)
        _check_cluster_ports(cluster, node_addr)
    argv = with_kvmul_defaults(argv, cuda=cuda, free_port_range=free_port_range, avoid=own_ports, node_addr=node_addr)
    if ours and kv_events_config_of(argv) is not None and settings.event_peers is None:
        # events we configured: readable by the controller only (node 0: the dist-init host)
        settings = settings.replace(event_peers=cluster.dist_host if cluster else "127.0.0.1")
    os.environ.update(settings.to_env())
    if device_of(argv, cuda) == "cpu":
        from sglang_kvmul.cpu_compat import cpu_env

        env = cpu_env(scheduler_processes(argv))
        os.environ.update(env)
        if "PYTHONPATH" in env:  # the spawned children read PYTHONPATH; this process needs sys.path
            sys.path[:0] = [p for p in env["PYTHONPATH"].split(os.pathsep) if p not in sys.path]
    return argv


def _check_cluster_ports(cluster, node_addr: str) -> None:
    """This node's derived KV-event ports (and node 0's registry) must be free on its address."""
    from sglang_kvmul.launch.ports import port_is_free

    pub, replay, registry = cluster.ports
    mine = [base + r for base in (pub, replay) for r in cluster.node_ranks(cluster.node_rank)]
    mine += [registry] if cluster.node_rank == 0 else []
    taken = [p for p in mine if not port_is_free(p, node_addr)]
    if taken:
        raise SystemExit(
            f"sglang_kvmul.launch_server: KV-event ports {taken} (derived from --dist-init-addr port "
            f"{cluster.dist_port}) are in use on {node_addr}; choose another --dist-init-addr port"
        )


def main(argv: list[str] | None = None) -> None:
    argv = prepare(list(sys.argv[1:] if argv is None else argv))
    from sglang_kvmul import METHOD_NAME
    from sglang_kvmul.launch.args import cluster_of, method_of
    from sglang_kvmul.serving.settings import KvmulSettings

    settings = KvmulSettings.from_env()
    cluster = cluster_of(argv)
    state_dir = None
    serves_http = cluster is None or cluster.node_rank == 0
    if method_of(argv) == METHOD_NAME and serves_http and settings.health_file is None:
        state_dir = tempfile.mkdtemp(prefix="sglang-kvmul-")  # 0700: only this user reads it
        settings = settings.replace(health_file=os.path.join(state_dir, "ranks.json"))
        os.environ.update(settings.to_env())

    from sglang.launch_server import run_server
    from sglang.srt.plugins import load_plugins
    from sglang.srt.server_args import prepare_server_args
    from sglang.srt.utils import kill_process_tree

    load_plugins()
    server_args = prepare_server_args(argv)
    if settings.health_file is not None and serves_http:
        from sglang.srt.entrypoints.http_server import app

        from sglang_kvmul.serving import health

        health.install(app, settings.health_file)
    try:
        run_server(server_args)
    finally:
        kill_process_tree(os.getpid(), include_parent=False)
        if state_dir is not None:
            shutil.rmtree(state_dir, ignore_errors=True)


if __name__ == "__main__":
    main()
