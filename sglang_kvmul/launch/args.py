"""The defaults `sglang_kvmul.launch_server` adds to a `sglang.launch_server` command line.

Pure argv rewriting: the user's own flags always win, and anything not named here passes through.
  * `--load-balance-method kvmul` when the controller has more than one rank (plain DP, attention
    DP or both) and no method is given;
  * for kvmul without `--kv-events-config`: SGLang's ZMQ KV-event publisher bound on 127.0.0.1,
    one port per rank, with the replay ports in a separate range (rank r uses base + r for both,
    so adjacent bases would collide), in the "dynamo" event format;
  * on CUDA, `--attention-backend flashinfer` unless an attention backend is chosen.
"""

from __future__ import annotations

import argparse
import json
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from sglang_kvmul import METHOD_NAME
from sglang_kvmul.core.rules import rule_help
from sglang_kvmul.serving.event_registration import registry_port
from sglang_kvmul.serving.settings import KvmulSettings


def _peek(argv: Sequence[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(add_help=False, allow_abbrev=False)
    p.add_argument("--dp-size", "--data-parallel-size", dest="dp_size", type=int, default=1)
    p.add_argument("--attn-dp-size", "--attention-data-parallel-size", dest="attn_dp_size", type=int, default=1)
    p.add_argument("--enable-dp-attention", action="store_true")  # deprecated: --dp-size N means attention DP
    p.add_argument("--tp-size", "--tp", "--tensor-parallel-size", dest="tp_size", type=int, default=1)
    p.add_argument("--pp-size", "--pipeline-parallel-size", dest="pp_size", type=int, default=1)
    p.add_argument("--load-balance-method", default=None)
    p.add_argument("--kv-events-config", default=None)
    p.add_argument("--attention-backend", default=None)
    p.add_argument("--prefill-attention-backend", default=None)
    p.add_argument("--decode-attention-backend", default=None)
    p.add_argument("--device", default=None)
    p.add_argument("--port", type=int, default=30000)
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--nnodes", type=int, default=1)
    p.add_argument("--node-rank", type=int, default=0)
    p.add_argument("--dist-init-addr", "--nccl-init-addr", dest="dist_init_addr", default=None)
    return p.parse_known_args(list(argv))[0]


@dataclass(frozen=True)
class Cluster:
    """Attention DP over several nodes: every node derives the same KV-event ports from
    `--dist-init-addr`, so the same command runs on each with only `--node-rank` differing."""

    nnodes: int
    node_rank: int
    dist_host: str
    dist_port: int
    ranks: int  # controller ranks over all nodes

    @property
    def ranks_per_node(self) -> int:
        return self.ranks // self.nnodes

    def node_ranks(self, node: int) -> range:
        return range(node * self.ranks_per_node, (node + 1) * self.ranks_per_node)

    @property
    def ports(self) -> tuple[int, int, int]:
        """(publisher base, replay base, rank registry) near the dist-init port, above it when they fit."""
        span = 2 * self.ranks + 1
        pub = self.dist_port + 1000 if self.dist_port + 1000 + span <= 65535 else self.dist_port - 1000 - span
        return pub, pub + self.ranks, registry_port(pub, self.ranks)


def cluster_of(argv: Sequence[str]) -> Cluster | None:
    a = _peek(argv)
    if a.nnodes <= 1 or not a.dist_init_addr:
        return None
    host, _, port = a.dist_init_addr.rpartition(":")
    return Cluster(a.nnodes, a.node_rank, host.strip("[]"), int(port), controller_ranks(argv))


def method_of(argv: Sequence[str]) -> str | None:
    return _peek(argv).load_balance_method


def host_of(argv: Sequence[str]) -> str:
    return _peek(argv).host


def kv_events_config(pub_base: int, replay_base: int, host: str = "127.0.0.1") -> str:
    """Publisher bound on `host` (loopback on one node, the node's own address across nodes); the
    "dynamo" format, whose block hashes also cover a request's extra_key (the default format leaves
    non-LoRA extra_key namespaces indistinguishable in the events)."""
    return json.dumps(
        {
            "publisher": "zmq",
            "endpoint": f"tcp://{host}:{pub_base}",
            "bind": True,
            "replay_endpoint": f"tcp://{host}:{replay_base}",
            "format": "dynamo",
        }
    )


def with_kvmul_defaults(
    argv: Sequence[str],
    *,
    cuda: bool,
    free_port_range: Callable[[int, set[int]], int],
    avoid: set[int] | None = None,
    node_addr: str | None = None,
) -> list[str]:
    """`argv` plus our defaults. `free_port_range(n, avoid)` returns a base of n free ports; the
    KV-event ranges also stay off `avoid` (our own ports, such as the metrics port). Across nodes
    the ports come from `--dist-init-addr` (`Cluster.ports`) and bind on `node_addr`."""
    args = _peek(argv)
    out = list(argv)
    method = args.load_balance_method
    ranks = controller_ranks(argv)
    if method is None and ranks > 1:
        method = METHOD_NAME
        out += ["--load-balance-method", METHOD_NAME]
    cluster = cluster_of(argv)
    if method == METHOD_NAME and args.kv_events_config is None and cluster is not None:
        pub, replay, _ = cluster.ports
        out += ["--kv-events-config", kv_events_config(pub, replay, node_addr or cluster.dist_host)]
    elif method == METHOD_NAME and args.kv_events_config is None:
        n = ranks
        taken = {args.port, *(avoid or ())}
        pub = free_port_range(n, taken)
        replay = free_port_range(n, {*taken, *range(pub, pub + n)})
        out += ["--kv-events-config", kv_events_config(pub, replay)]
    uses_cuda = cuda and (args.device in (None, "cuda"))
    if uses_cuda and not (args.attention_backend or args.prefill_attention_backend or args.decode_attention_backend):
        out += ["--attention-backend", "flashinfer"]
    return out


def split_own_flags(argv: Sequence[str]) -> tuple[list[str], KvmulSettings]:
    """Remove this launcher's own flags; return SGLang's argv and the controller's settings
    (the environment's `SGLANG_KVMUL_*` values, overridden by the flags), validated."""
    p = argparse.ArgumentParser(add_help=False, allow_abbrev=False)
    p.add_argument("--kvmul-metrics-port", type=int, default=None)
    p.add_argument("--kvmul-metrics-host", default=None)
    p.add_argument("--kvmul-policy", default=None, help=rule_help())
    own, rest = p.parse_known_args(list(argv))
    settings = KvmulSettings.from_env()
    changes = {
        "policy": own.kvmul_policy,
        "metrics_port": own.kvmul_metrics_port,
        "metrics_host": own.kvmul_metrics_host,
    }
    settings = settings.replace(**{k: v for k, v in changes.items() if v is not None})
    return rest, settings.validate()


def device_of(argv: Sequence[str], cuda: bool) -> str:
    return _peek(argv).device or ("cuda" if cuda else "cpu")


def kv_events_config_of(argv: Sequence[str]) -> str | None:
    return _peek(argv).kv_events_config


def controller_ranks(argv: Sequence[str]) -> int:
    """DP ranks the controller dispatches to, as SGLang counts them: `dp_size * attn_dp_size`, with the
    deprecated `--dp-size N --enable-dp-attention` meaning `--attn-dp-size N`."""
    a = _peek(argv)
    if a.enable_dp_attention:
        return a.dp_size
    return a.dp_size * a.attn_dp_size


def scheduler_processes(argv: Sequence[str]) -> int:
    """Scheduler processes on this node: one per TP x PP rank of every DP replica (attention DP
    shares the TP group), split over `--nnodes`."""
    a = _peek(argv)
    replicas = 1 if a.enable_dp_attention else a.dp_size
    return max(1, replicas * a.tp_size * a.pp_size // max(1, a.nnodes))
