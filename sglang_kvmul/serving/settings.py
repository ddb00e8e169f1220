"""Everything the launcher hands to the controller, in one object.

SGLang starts the controller in a process of its own, from its own argv, so our settings travel in
the environment: `to_env()` in the launcher (and in tests, the demo and benchmarks), `from_env()`
in the controller. Every field is `SGLANG_KVMUL_<FIELD>`; an unset variable keeps the default.
Pure (no SGLang import): the launcher reads it before SGLang is imported.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Mapping
from dataclasses import dataclass, fields

from sglang_kvmul.core.rules import DEFAULT_RULE

PREFIX = "SGLANG_KVMUL_"


@dataclass(frozen=True)
class KvmulSettings:
    policy: str = DEFAULT_RULE  # routing rule (`core.rules.REGISTRY`)
    metrics_port: int | None = None  # Prometheus endpoint of the controller; None: off
    metrics_host: str = "127.0.0.1"
    decision_log: str | None = None  # append one JSON line per decision to this file
    # Give stock methods the controller's blocking poll loop too (SGLang 0.5.23's own loop spins a
    # core). Off by default so that stock methods stay exactly stock; benchmarks turn it on.
    poll_all_methods: bool = False
    # The dispatch loop's knobs (`dispatch_loop`): event batches per rank per wake-up (a request
    # waits behind at most one), the idle wake-up that keeps SGLang's watchdog fed, how often the
    # SHM load snapshots are re-read, and the size of the sticky-session table.
    slice_batches: int = 8
    poll_ms: int = 100
    snapshot_refresh_s: float = 0.005
    max_sticky_sessions: int = 100_000
    max_inflight_tracked: int = 4096  # recent requests per rank answered (503) if that rank dies
    replay_timeout_ms: int = 1000  # a replay endpoint that stays silent this long is given up
    # Source addresses allowed to read the KV events (comma-separated; `event_privacy`): the
    # controller's. The launcher sets it when it configures the events itself; None: unrestricted.
    event_peers: str | None = None
    # Attention DP across nodes: this node's address, where its ranks' KV events bind (default: the
    # address `--host` names, else the one that routes to `--dist-init-addr`).
    node_addr: str | None = None
    unreachable_after_s: float = 10.0  # a rank whose event stream has not connected by then is stale
    # Where the controller writes which ranks are down, for the launcher's `/health` (`health`);
    # the launcher sets it (a file in a private directory of its own); None: not written.
    health_file: str | None = None

    def to_env(self) -> dict[str, str]:
        """The variables that reproduce these settings (fields at their default are left out)."""
        out = {}
        for f in fields(self):
            value = getattr(self, f.name)
            if value != f.default:
                out[PREFIX + f.name.upper()] = ("1" if value else "0") if isinstance(value, bool) else str(value)
        return out

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None) -> KvmulSettings:
        """Settings from `environ` (default: this process's); a malformed value is a clear error."""
        environ = os.environ if environ is None else environ
        values: dict[str, object] = {}
        for f in fields(cls):
            raw = environ.get(PREFIX + f.name.upper())
            if raw is None or raw == "":
                continue
            kind = type(f.default) if f.default is not None else (int if f.name.endswith("port") else str)
            try:
                values[f.name] = raw.strip().lower() in ("1", "true", "yes") if kind is bool else kind(raw)
            except ValueError:
                raise ValueError(f"{PREFIX}{f.name.upper()}={raw!r} is not a valid {kind.__name__}") from None
        return cls(**values)

    def replace(self, **changes: object) -> KvmulSettings:
        return dataclasses.replace(self, **changes)

    def validate(self) -> KvmulSettings:
        """Raise ValueError naming the setting if one cannot work (before anything is started)."""
        from sglang_kvmul.core.rules import rule_by_name

        rule_by_name(self.policy)
        if self.metrics_port is not None and not 0 < self.metrics_port < 65536:
            raise ValueError(f"metrics port {self.metrics_port} is outside 1..65535")
        for name in ("slice_batches", "poll_ms", "max_sticky_sessions", "max_inflight_tracked", "replay_timeout_ms"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        return self
