"""What each scheduler reports past SGLang's decode sums: the requests not yet decoding, and the
outputs it finished (read by `marginal_fresh`, through `core.load_ledger` and `core.decode_cost`).

A pause costs a request's TPOT by its output length, which the DP controller never sees (outputs go
from the schedulers to the detokenizer). So each scheduler counts, per finished request with two or
more output tokens, its output and 1 / (output - 1), and at each load snapshot its running requests
that have not decoded past their first token. They travel appended to the snapshot's
`decode_moments` (`load_ledger.FRESH`, `FINISHED`): the snapshot is a fixed msgspec struct that the
controller decodes with SGLang's own type, and this list is the one field that carries more figures
without changing both ends; SGLang itself reads none of its items (0.5.23: only the controller does).
Installed by the plugin in each scheduler's process (and by the upstream patch). Counts, never token
ids: nothing of a prompt or an output leaves the scheduler.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable
from typing import Any

logger = logging.getLogger(__name__)

# this process's scheduler: finished requests with two or more output tokens, their outputs' sum,
# the sum of 1 / (output - 1) (cumulative, as SGLang's own counters in the snapshot)
_FINISHED = [0.0, 0.0, 0.0]
_SIX = 6  # SGLang's decode sums (steps, sum b, sum t_us, sum b^2, sum b*t_us, generated)


def count_finished(reqs: Iterable[Any], totals: list[float]) -> None:
    """Add the finished, not aborted requests among `reqs` to `totals`, each once."""
    for req in reqs:
        if getattr(req, "_kvmul_output_counted", False) or not req.finished():
            continue
        req._kvmul_output_counted = True
        if type(req.finished_reason).__name__ == "FINISH_ABORT":
            continue  # cut short by the client or an error: not the output the fleet serves
        n = len(req.output_ids)
        if n > 1:
            totals[0] += 1.0
            totals[1] += n
            totals[2] += 1.0 / (n - 1)


def with_fresh(moments: list[float] | None, running: Iterable[Any], totals: list[float]) -> list[float]:
    """The snapshot's decode sums (zeros before the first decode step) with the fresh requests and the
    finished outputs appended."""
    fresh = sum(1 for req in running if len(req.output_ids) <= 1)
    base = list(moments[:_SIX]) if moments else [0.0] * _SIX
    return [*base, float(fresh), *totals]


def install() -> None:
    """Wrap the scheduler's generation output (to count finished outputs) and its load snapshot (to
    append the figures). Idempotent; a failure in either leaves SGLang's own figures as they were."""
    from sglang.srt.managers.scheduler_components.load_inquirer import SchedulerLoadInquirer
    from sglang.srt.managers.scheduler_components.output_streamer import SchedulerOutputStreamer

    if getattr(SchedulerLoadInquirer.get_loads, "kvmul_fresh", False):
        return
    # every generation output goes through this one (stream_output and the idle-batch path)
    stream, get_loads = SchedulerOutputStreamer._stream_output_generation, SchedulerLoadInquirer.get_loads

    def counting_stream(self, reqs, *args, **kwargs):
        try:
            count_finished(reqs, _FINISHED)
        except Exception:  # never stop a scheduler's output for a statistic
            logger.exception("kvmul: counting finished outputs failed")
        return stream(self, reqs, *args, **kwargs)

    def reporting_get_loads(self):
        snap = get_loads(self)
        try:
            snap.decode_moments = with_fresh(snap.decode_moments, self.get_running_batch().reqs, _FINISHED)
        except Exception:
            logger.exception("kvmul: adding the fresh requests to the load snapshot failed")
        return snap

    reporting_get_loads.kvmul_fresh = True  # type: ignore[attr-defined]
    SchedulerOutputStreamer._stream_output_generation = counting_stream
    SchedulerLoadInquirer.get_loads = reporting_get_loads
