"""The defaults `sglang_kvmul.launch_server` adds to a `sglang.launch_server` command line.

Pure argv rewriting: the user's own flags always win, and anything not named here passes through.
  * `--load-balance-method kvmul` when dp > 1 and no method is given;
  * for kvmul without `--kv-events-config`: SGLang's ZMQ KV-event publisher bound on 127.0.0.1,
    one port per rank, with the replay ports in a separate range (rank r uses base + r for both,
    so adjacent bases would collide), in the "dynamo" event format;
  * on CUDA, `--attention-backend flashinfer` unless an attention backend is chosen.
"""

from __future__ import annotations

import argparse
import json
from collections.abc import Callable, Sequence

from sglang_kvmul import METHOD_NAME


def _peek(argv: Sequence[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(add_help=False, allow_abbrev=False)
    p.add_argument("--dp-size", "--data-parallel-size", dest="dp_size", type=int, default=1)
    p.add_argument("--load-balance-method", default=None)
    p.add_argument("--kv-events-config", default=None)
    p.add_argument("--attention-backend", default=None)
    p.add_argument("--prefill-attention-backend", default=None)
    p.add_argument("--decode-attention-backend", default=None)
    p.add_argument("--device", default=None)
    p.add_argument("--port", type=int, default=30000)
    return p.parse_known_args(list(argv))[0]


def kv_events_config(pub_base: int, replay_base: int) -> str:
    """Loopback publisher; the "dynamo" format, whose block hashes also cover a request's extra_key
    (the default format leaves non-LoRA extra_key namespaces indistinguishable in the events)."""
    return json.dumps(
        {
            "publisher": "zmq",
            "endpoint": f"tcp://127.0.0.1:{pub_base}",
            "bind": True,
            "replay_endpoint": f"tcp://127.0.0.1:{replay_base}",
            "format": "dynamo",
        }
    )


def with_kvmul_defaults(
    argv: Sequence[str],
    *,
    cuda: bool,
    free_port_range: Callable[[int, set[int]], int],
) -> list[str]:
    """`argv` plus our defaults. `free_port_range(n, avoid)` returns a base of n free ports."""
    args = _peek(argv)
    out = list(argv)
    method = args.load_balance_method
    if method is None and args.dp_size > 1:
        method = METHOD_NAME
        out += ["--load-balance-method", METHOD_NAME]
    if method == METHOD_NAME and args.kv_events_config is None:
        n = args.dp_size
        pub = free_port_range(n, {args.port})
        replay = free_port_range(n, {args.port, *range(pub, pub + n)})
        out += ["--kv-events-config", kv_events_config(pub, replay)]
    uses_cuda = cuda and (args.device in (None, "cuda"))
    if uses_cuda and not (args.attention_backend or args.prefill_attention_backend or args.decode_attention_backend):
        out += ["--attention-backend", "flashinfer"]
    return out


def split_own_flags(argv: Sequence[str]) -> tuple[list[str], dict[str, str]]:
    """Remove this launcher's own flags; return SGLang's argv and the environment they set."""
    p = argparse.ArgumentParser(add_help=False, allow_abbrev=False)
    p.add_argument("--kvmul-metrics-port", type=int, default=None)
    p.add_argument("--kvmul-metrics-host", default=None)
    p.add_argument("--kvmul-policy", default=None)
    own, rest = p.parse_known_args(list(argv))
    env = {}
    if own.kvmul_policy is not None:
        from sglang_kvmul.policies import rule_by_name

        rule_by_name(own.kvmul_policy)  # reject an unknown rule before starting anything
        env["SGLANG_KVMUL_POLICY"] = own.kvmul_policy
    if own.kvmul_metrics_port is not None:
        env["SGLANG_KVMUL_METRICS_PORT"] = str(own.kvmul_metrics_port)
    if own.kvmul_metrics_host is not None:
        env["SGLANG_KVMUL_METRICS_HOST"] = own.kvmul_metrics_host
    return rest, env


def device_of(argv: Sequence[str], cuda: bool) -> str:
    return _peek(argv).device or ("cuda" if cuda else "cpu")


def dp_size_of(argv: Sequence[str]) -> int:
    return _peek(argv).dp_size
