"""Finding free loopback TCP ports for sockets that are bound later, by another process.

The range sits below SGLang's own choice for such ports (22000-29999) and below the kernel's
ephemeral range (32768+), where bind(0) and outgoing connections take ports at any moment.
"""

from __future__ import annotations

import random
import socket


def port_is_free(port: int, host: str = "127.0.0.1") -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind((host, port))
        except OSError:
            return False
    return True


def free_port_range(n: int, avoid: set[int] | None = None, lo: int = 10000, hi: int = 21999) -> int:
    """Base of `n` consecutive free loopback ports, none of them in `avoid`."""
    avoid = avoid or set()
    rng = random.Random()
    for _ in range(1000):
        base = rng.randrange(lo, hi - n)
        ports = range(base, base + n)
        if not avoid.intersection(ports) and all(port_is_free(p) for p in ports):
            return base
    raise RuntimeError(f"no {n} consecutive free ports in [{lo}, {hi})")
