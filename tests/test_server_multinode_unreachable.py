"""Two nodes (tests/two_nodes.py) where node 1's KV-event publisher cannot be reached: its rank is
stale, counted, and still served. A module of its own so that the healthy cluster of
test_server_multinode.py is stopped before this one starts (four launchers on two cores)."""

from __future__ import annotations

import random
import time

import pytest
from routing_checks import ids
from two_nodes import two_nodes, wait_metric

pytestmark = pytest.mark.server


def test_an_unreachable_node_is_stale_counted_and_still_served(tmp_path_factory):
    # node 1's event sockets admit only 127.0.0.9: the controller's subscription is refused, as a
    # firewall between the nodes would refuse it (a fault the two processes cannot show otherwise)
    with two_nodes(tmp_path_factory.mktemp("cut-off"), {"SGLANG_KVMUL_EVENT_PEERS": "127.0.0.9"}) as server:
        wait_metric(server, "kvmul_stale", "1", lambda v: v == 1.0, timeout=60)
        assert server.metric("kvmul_stale")["0"] == 0.0
        rng = random.Random(42)
        for rank in (0, 1):
            resp = server.generate(ids(rng, 64), rid=f"cut-{rank}", routed_dp_rank=rank)
            assert resp.status_code == 200 and resp.json()["meta_info"]["dp_rank"] == rank
        resp = server.generate(ids(rng, 64), rid="cut-routed")
        assert resp.status_code == 200
        deadline = time.monotonic() + 30  # the controller logs it once unreachable_after_s has passed
        while "unreachable; scored by load" not in (text := server.server.log_path.read_text()):
            assert time.monotonic() < deadline
            time.sleep(0.2)  # polling interval
        assert "rank 1's KV events at tcp://127.0.0.2:" in text and "unreachable; scored by load" in text
        assert server.metric_total("kvmul_unreachable_event_streams_total") == 1.0
