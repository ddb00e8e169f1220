"""Attention DP across nodes: each node's address, and how node 0's controller learns it.

Every node's ranks publish their KV events on that node's own address (never on all interfaces).
Node 0's controller cannot know the other nodes' addresses from SGLang, so each other node's
launcher registers its address with node 0 (a REQ to the registry port derived from
`--dist-init-addr`, `args.Cluster.ports`), retrying until the controller answers. Until a node has
registered and its streams have connected, its ranks are scored by load alone (stale).
"""

from __future__ import annotations

import ipaddress
import json
import logging
import socket
import threading

from sglang_kvmul.launch.args import Cluster

logger = logging.getLogger(__name__)
RETRY_MS = 1000


def node_address(host: str | None, dist_host: str) -> str:
    """`--host` when it names one address the other nodes can reach (loopback only when the whole
    cluster is on loopback); else the local address that routes to `dist_host`."""
    if host:
        try:
            addr = ipaddress.ip_address(host)
            if not addr.is_unspecified and (not addr.is_loopback or ipaddress.ip_address(dist_host).is_loopback):
                return addr.compressed
        except ValueError:
            pass
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.connect((dist_host, 9))  # no packet is sent: this only asks the routing table
        return s.getsockname()[0]


def register(cluster: Cluster, addr: str, stop: threading.Event | None = None) -> threading.Thread:
    """Node k > 0: tell node 0's controller where this node's ranks publish, until it answers."""
    import zmq

    def run() -> None:
        ctx = zmq.Context.instance()
        endpoint = f"tcp://{cluster.dist_host}:{cluster.ports[2]}"
        message = json.dumps({"node_rank": cluster.node_rank, "addr": addr}).encode()
        while stop is None or not stop.is_set():
            req = ctx.socket(zmq.REQ)
            req.setsockopt(zmq.LINGER, 0)
            req.connect(endpoint)
            req.send(message)
            answered = req.poll(RETRY_MS)
            req.close()
            if answered:
                logger.info("kvmul: node %d registered its KV events at %s with %s", cluster.node_rank, addr, endpoint)
                return

    thread = threading.Thread(target=run, name="kvmul-node-registration", daemon=True)
    thread.start()
    return thread
