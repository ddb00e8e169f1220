"""`/health` that names a lost DP rank.

SGLang's `/health` answers 200 from the HTTP process without asking the controller, and its
`/health_generate` is satisfied by any live rank, so neither notices that one rank of several died:
the server goes on at reduced capacity while every probe says healthy. A rank never comes back in
SGLang (nothing restarts a scheduler), so the server should be replaced: the controller, which
detects the loss, writes the rank states to a small file in a private directory the launcher
made; the launcher's HTTP process answers `/health` and `/health_generate` with 503 and a JSON body
naming the down ranks while any is down (orchestrators restart it, the gateway routes elsewhere),
and leaves them to SGLang otherwise.
"""

from __future__ import annotations

import json
import logging
import os
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

logger = logging.getLogger(__name__)

HEALTH_PATHS = frozenset({"/health", "/health_generate"})


def write_rank_states(path: str, down: Sequence[bool], reasons: dict[int, str]) -> None:
    """Atomically replace `path` with the ranks' states (a reader never sees a half-written file)."""
    state = {
        "down_ranks": [r for r, d in enumerate(down) if d],
        "live_ranks": [r for r, d in enumerate(down) if not d],
        "reasons": {str(r): why for r, why in sorted(reasons.items())},
    }
    directory = os.path.dirname(path) or "."
    fd, tmp = tempfile.mkstemp(dir=directory, prefix=".ranks-")
    try:
        with os.fdopen(fd, "w") as f:
            json.dump(state, f)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def read_rank_states(path: str) -> dict[str, Any] | None:
    """The states the controller wrote, or None before it wrote any (or if unreadable)."""
    try:
        with open(path) as f:
            return json.load(f)
    except (OSError, ValueError):
        return None


class RankHealth:
    """ASGI middleware: `/health` and `/health_generate` answer 503 with the rank states while a
    rank is down; everything else (and those paths while all ranks are up) goes to SGLang."""

    def __init__(self, app: Any, path: str) -> None:
        self.app = app
        self.path = path

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        if scope["type"] == "http" and scope["path"] in HEALTH_PATHS:
            state = read_rank_states(self.path)
            if state and state.get("down_ranks"):
                from starlette.responses import JSONResponse

                await JSONResponse({"status": "degraded", **state}, status_code=503)(scope, receive, send)
                return
        await self.app(scope, receive, send)


def install(app: Any, path: str) -> None:
    """Add `RankHealth` to `app` (SGLang's FastAPI app), reading the controller's file at `path`."""
    app.add_middleware(RankHealth, path=path)
