"""Start and stop a local SGLang server process (tests, demo, benchmarks).

The server runs in its own process group, so stopping it kills exactly the processes it started;
SGLang's load-snapshot files that appeared in /dev/shm during its life, and the shared-memory
message queues its processes created, are removed afterwards (SGLang leaves them behind on every
shutdown).
"""

from __future__ import annotations

import glob
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager, suppress
from dataclasses import dataclass, field
from pathlib import Path

import psutil
import requests

from sglang_kvmul.launch.ports import free_port_range

SHM_GLOB = "/dev/shm/sglang_loads_*"
SHM_MQ_PREFIX = "/dev/shm/sgl_shm_mq_"  # + the creating process's pid: TP groups' broadcast queues


def cpu_server_args(max_total_tokens: int) -> list[str]:
    """Flags for a CPU server with dummy weights (see the CPU notes for why each is needed)."""
    return [
        "--device", "cpu",
        "--load-format", "dummy",
        "--max-total-tokens", str(max_total_tokens),
        "--sleep-on-idle",
        "--skip-server-warmup",
    ]  # fmt: skip


@dataclass
class LocalServer:
    proc: subprocess.Popen
    port: int
    log_path: Path
    shm_before: set[str] = field(default_factory=set)
    host: str = "127.0.0.1"

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"

    def log_tail(self, n: int = 80) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-n:])
        except OSError:
            return ""

    def wait_ready(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"server exited with {self.proc.returncode}:\n{self.log_tail()}")
            try:
                if requests.get(self.url + "/health", timeout=2).status_code == 200:
                    return
            except requests.RequestException:
                pass
            time.sleep(0.25)  # polling interval while waiting for /health, not a synchronisation
        raise TimeoutError(f"server not healthy after {timeout:.0f} s:\n{self.log_tail()}")

    def wait_child(self, title: str, timeout: float) -> None:
        """Wait until a process titled `title` (e.g. `sglang::data_parallel_controller`) runs under this server.

        SGLang starts its subprocesses only after it has checked its ports, so two "nodes" on one
        machine start in turn: node 0 binds ports on the cluster address that node 1's checks
        (which bind every interface) would otherwise find taken, and node 1 gives up after 30 s.
        """
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"server exited with {self.proc.returncode}:\n{self.log_tail()}")
            with suppress(psutil.Error):
                for child in psutil.Process(self.proc.pid).children(recursive=True):
                    with suppress(psutil.Error):
                        if title in " ".join(child.cmdline()):
                            return
            time.sleep(0.25)  # polling interval while waiting for the process, not a synchronisation
        raise TimeoutError(f"no {title} process after {timeout:.0f} s:\n{self.log_tail()}")

    def stop(self, grace_s: float = 20.0) -> None:
        """Stop the server as a service manager would: SIGTERM to the launcher, which shuts SGLang
        down and removes its private state directory, then SIGKILL to whatever of the process group
        is left (all of it, if the launcher has not exited within `grace_s`). A SIGKILL alone would
        leave the launcher's state directory behind."""
        pids = {self.proc.pid}
        with suppress(psutil.Error):  # before the kill: whose shared-memory queues are ours
            pids |= {p.pid for p in psutil.Process(self.proc.pid).children(recursive=True)}
        if self.proc.poll() is None:
            with suppress(ProcessLookupError):
                self.proc.terminate()
            with suppress(subprocess.TimeoutExpired):
                self.proc.wait(timeout=grace_s)
        with suppress(ProcessLookupError):  # the group outlives its leader while any member runs
            os.killpg(self.proc.pid, signal.SIGKILL)
        self.proc.wait(timeout=30)
        leftovers = set(glob.glob(SHM_GLOB)) - self.shm_before
        leftovers |= {p for pid in pids for p in glob.glob(f"{SHM_MQ_PREFIX}{pid}_*")}
        for path in leftovers:
            with suppress(OSError):
                os.remove(path)


def start_server(
    model_path: str | Path,
    args: Sequence[str],
    log_path: Path,
    *,
    launcher: str = "sglang_kvmul.launch_server",
    env: dict[str, str] | None = None,
    port: int | None = None,
    timeout: float = 240.0,
    attempts: int = 3,
    command: Sequence[str] | None = None,
    host: str = "127.0.0.1",
    wait: bool = True,
) -> LocalServer:
    """Launch `python -m <launcher>` (or `command`, told its port by $PORT) on `host` and wait for
    /health (`wait=False`: return at once; the caller waits, e.g. for the other nodes first).

    A start that loses a race for one of its ports (another process bound it between our check
    and the server's bind) is retried on fresh ports.
    """
    for attempt in range(attempts):
        try:
            return _start_once(model_path, args, log_path, launcher, env, port, timeout, command, host, wait)
        except RuntimeError:
            lost_race = "address already in use" in log_path.read_text(errors="replace")
            if not lost_race or attempt == attempts - 1:
                raise
            port = None
    raise AssertionError("unreachable")


def _start_once(
    model_path: str | Path,
    args: Sequence[str],
    log_path: Path,
    launcher: str,
    env: dict[str, str] | None,
    port: int | None,
    timeout: float,
    command: Sequence[str] | None,
    host: str = "127.0.0.1",
    wait: bool = True,
) -> LocalServer:
    port = port or free_port_range(1)
    if command is not None:
        cmd = [*command, *args]
        env = {**(env or {}), "PORT": str(port), "MODEL": str(model_path)}
    else:
        cmd = [sys.executable, "-m", launcher, "--model-path", str(model_path), "--host", host]
        cmd += ["--port", str(port), *args]
    log_path.parent.mkdir(parents=True, exist_ok=True)
    shm_before = set(glob.glob(SHM_GLOB))
    with open(log_path, "w") as log:
        proc = subprocess.Popen(
            cmd, stdout=log, stderr=subprocess.STDOUT, env={**os.environ, **(env or {})}, start_new_session=True
        )
    server = LocalServer(proc, port, log_path, shm_before, host)
    if not wait:
        return server
    try:
        server.wait_ready(timeout)
    except BaseException:
        server.stop()
        raise
    return server


@contextmanager
def running_server(
    model_path: str | Path, args: Sequence[str], log_path: Path, **kwargs: object
) -> Iterator[LocalServer]:
    server = start_server(model_path, args, log_path, **kwargs)  # type: ignore[arg-type]
    try:
        yield server
    finally:
        server.stop()
