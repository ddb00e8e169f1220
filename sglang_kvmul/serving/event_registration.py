"""Attention DP across nodes: each rank's KV publisher tells node 0's controller where it publishes.

Every node's ranks publish on that node's own address (never on all interfaces unless the user's
`--kv-events-config` asks), and SGLang does not tell node 0 the other nodes' addresses. So each
publisher on a node other than 0, once bound, registers `{"rank", "addr"}` with the controller's
registry (a REQ to the port after both KV-event ranges on the `--dist-init-addr` host), retrying
until it answers. It runs in the scheduler processes (installed by the plugin, and by the upstream
patch from SGLang's publisher module), so a patched SGLang needs no launcher for it. Until a rank
has registered and its stream connected, the controller scores it by load alone (stale).
"""

from __future__ import annotations

import ipaddress
import json
import logging
import socket
import threading
from urllib.parse import urlsplit

logger = logging.getLogger(__name__)
RETRY_MS = 1000


def registry_port(pub_base: int, num_ranks: int) -> int:
    """The controller's registry: after the publisher range and the replay range."""
    return pub_base + 2 * num_ranks


def node_address(host: str | None, dist_host: str) -> str:
    """`host` when it names one address the other nodes can reach (loopback only when the whole
    cluster is on loopback); else the local address that routes to `dist_host`."""
    if host:
        try:
            addr = ipaddress.ip_address(host.strip("[]"))
            if not addr.is_unspecified and (not addr.is_loopback or ipaddress.ip_address(dist_host).is_loopback):
                return addr.compressed
        except ValueError:
            pass
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.connect((dist_host, 9))  # no packet is sent: this only asks the routing table
        return s.getsockname()[0]


def announce(rank: int, addr: str, registry: str, stop: threading.Event | None = None) -> threading.Thread:
    """Register `rank` publishing on `addr` at `registry` (tcp://host:port) until it answers."""
    import zmq

    def run() -> None:
        ctx = zmq.Context.instance()
        message = json.dumps({"rank": rank, "addr": addr}).encode()
        while stop is None or not stop.is_set():
            req = ctx.socket(zmq.REQ)
            req.setsockopt(zmq.LINGER, 0)
            req.connect(registry)
            req.send(message)
            answered = req.poll(RETRY_MS)
            req.close()
            if answered:
                logger.info("kvmul: rank %d registered its KV events at %s with %s", rank, addr, registry)
                return

    thread = threading.Thread(target=run, name=f"kvmul-event-registration-{rank}", daemon=True)
    thread.start()
    return thread


def _announce_publisher(publisher) -> None:
    """After a publisher bound: register it if it runs on a node other than 0 of several."""
    from sglang.srt.runtime_context import get_parallel

    parallel = get_parallel()
    if int(parallel.nnodes or 1) <= 1 or int(parallel.node_rank or 0) == 0 or not parallel.dist_init_addr:
        return
    dist_host, _, _ = str(parallel.dist_init_addr).rpartition(":")
    dist_host = dist_host.strip("[]")
    rank = int(publisher._dp_rank)
    endpoint = urlsplit(publisher._endpoint)
    pub_base = int(endpoint.port) - rank
    addr = node_address(endpoint.hostname if endpoint.hostname != "*" else None, dist_host)
    announce(rank, addr, f"tcp://{dist_host}:{registry_port(pub_base, int(parallel.num_dp_ranks))}")


def install() -> None:
    """Make every ZmqEventPublisher this process creates register itself across nodes."""
    from sglang.srt.disaggregation.kv_events import ZmqEventPublisher

    if getattr(ZmqEventPublisher._socket_setup, "kvmul_registers", False):
        return
    original = ZmqEventPublisher._socket_setup

    def registering_socket_setup(self) -> None:
        original(self)
        try:
            _announce_publisher(self)
        except Exception as exc:  # never stop a publisher: its rank is then scored by load
            logger.error("kvmul: rank %s could not register its KV events: %s", getattr(self, "_dp_rank", "?"), exc)

    registering_socket_setup.kvmul_registers = True
    ZmqEventPublisher._socket_setup = registering_socket_setup
