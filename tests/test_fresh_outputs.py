"""The schedulers' count of finished outputs and fresh requests (`serving.fresh_outputs`), as pure
functions over request objects: what SGLang's `Req` exposes to it (`finished()`, `finished_reason`,
`output_ids`), stood in for by plain objects. The real scheduler path is checked end to end in
`test_server_kvmul.py` (`test_finished_outputs_reach_the_router_each_counted_once`)."""

from types import SimpleNamespace

import pytest

from sglang_kvmul.serving.fresh_outputs import count_finished, with_fresh


class FINISH_ABORT:  # SGLang's class name, which the count recognises
    pass


def _req(outputs: int, finished: bool = True, reason: object = None) -> SimpleNamespace:
    return SimpleNamespace(output_ids=[7] * outputs, finished=lambda: finished, finished_reason=reason)


def test_finished_outputs_are_counted_once_and_aborts_and_one_token_outputs_not_at_all():
    totals = [0.0, 0.0, 0.0]
    done, running, aborted, single = _req(5), _req(3, finished=False), _req(9, reason=FINISH_ABORT()), _req(1)
    count_finished([done, running, aborted, single], totals)
    count_finished([done], totals)  # streamed again: not counted twice
    assert totals == pytest.approx([1.0, 5.0, 1 / 4])


def test_snapshot_sums_get_the_fresh_requests_and_the_outputs_appended():
    running = [_req(1, finished=False), _req(1, finished=False), _req(4, finished=False)]
    six = [10.0, 20.0, 3e4, 50.0, 6e4, 20.0]
    assert with_fresh(six, running, [2.0, 30.0, 0.6]) == [*six, 2.0, 2.0, 30.0, 0.6]
    assert with_fresh(None, [], [0.0, 0.0, 0.0]) == [0.0] * 6 + [0.0, 0.0, 0.0, 0.0]  # before any decode step
