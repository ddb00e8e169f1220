"""KV events are prompts' token ids: only the controller may read them.

SGLang 0.5.23 publishes them unauthenticated (so do Dynamo and llm-d); its own source-address
allowlist (`SGLANG_ZMQ_ALLOWED_PEERS`, ZAP) covers its attention-DP worker sockets, not the KV
publisher. This puts the same guard on the publisher's PUB and replay sockets, in the scheduler
processes (the plugin calls `install` there): a ZAP handler on the publisher's context that admits
only the given source addresses, and a ZAP domain set on each of its sockets before they bind.

What it guards: a process on another host (or on another loopback address) cannot subscribe to,
or replay, this node's events. What it does not: the bytes on the wire are plaintext, so anyone
who can read the network between the nodes reads them; and any process on an allowed address (for
one node, anything on 127.0.0.1) is let in. If that matters, run the event plane over an encrypted
network (WireGuard, IPsec) or a host-local link; ZMQ's CURVE would need keys in SGLang's publisher.
"""

from __future__ import annotations

import ipaddress
import logging
from collections.abc import Sequence

logger = logging.getLogger(__name__)

ZAP_DOMAIN = b"sglang-kvmul-events"


class _ZapContext:
    """The publisher's context, handing out sockets with the ZAP domain set (so before any bind)."""

    def __init__(self, ctx) -> None:
        self._ctx = ctx

    def socket(self, *args, **kwargs):
        sock = self._ctx.socket(*args, **kwargs)
        sock.zap_domain = ZAP_DOMAIN
        return sock

    def __getattr__(self, name: str):
        return getattr(self._ctx, name)


def _authenticator(ctx, peers: Sequence[str]) -> None:
    """One ZAP handler per context (shared with SGLang's own allowlist if it has one there)."""
    from sglang.srt.utils import network
    from zmq.auth.thread import ThreadAuthenticator

    allowed = [ipaddress.ip_address(p).compressed for p in peers]
    with network._zmq_authenticators_lock:
        auth = network._zmq_authenticators.get(ctx.underlying)
        if auth is None:
            auth = ThreadAuthenticator(ctx)
            auth.start()
            network._zmq_authenticators[ctx.underlying] = auth
        auth.allow(*allowed)


def install(peers: Sequence[str]) -> None:
    """Restrict every ZmqEventPublisher this process creates to `peers` (IP addresses)."""
    from sglang.srt.disaggregation.kv_events import ZmqEventPublisher

    if getattr(ZmqEventPublisher._socket_setup, "kvmul_private", False):
        return
    original = ZmqEventPublisher._socket_setup

    def private_socket_setup(self) -> None:
        _authenticator(self._ctx, peers)
        ctx, self._ctx = self._ctx, _ZapContext(self._ctx)
        try:
            original(self)
        finally:
            self._ctx = ctx
        logger.info("kvmul: KV-event sockets accept only %s", ", ".join(peers))

    private_socket_setup.kvmul_private = True
    ZmqEventPublisher._socket_setup = private_socket_setup


def install_from_env() -> None:
    """`install` with the peers the launcher put in the environment (`KvmulSettings.event_peers`)."""
    from sglang_kvmul.serving.settings import KvmulSettings

    peers = KvmulSettings.from_env().event_peers
    if peers:
        install([p.strip() for p in peers.split(",") if p.strip()])
