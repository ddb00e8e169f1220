"""KvmulDispatcher on real ZMQ sockets: every request is forwarded once or answered once, bad
input is a 400 naming the field, and a rank whose scheduler is gone stops receiving and has its
requests answered. (A scheduler that dies is shown here by closing its end of the socket, which is
what the controller sees; the real SIGKILL is in test_server_faults.py.)"""

from __future__ import annotations

import pickle
import time
from array import array
from collections import Counter
from pathlib import Path
from types import SimpleNamespace

import pytest
import zmq
from helpers import request

from sglang_kvmul.core.router import KvmulRouter
from sglang_kvmul.serving.dispatcher import KvmulDispatcher

N = 3
VOCAB = 2048


class Rig:
    def __init__(self, tmp: Path) -> None:
        self.ctx = zmq.Context()
        self.workers, self.sinks = [], []
        for r in range(N):
            push, pull = self.ctx.socket(zmq.PUSH), self.ctx.socket(zmq.PULL)
            push.bind(f"ipc://{tmp}/w{r}")  # as SGLang does: the controller binds, the scheduler connects
            monitor = push.get_monitor_socket(zmq.EVENT_HANDSHAKE_SUCCEEDED)
            pull.connect(f"ipc://{tmp}/w{r}")
            assert monitor.poll(5000)  # connected, as SGLang's schedulers are before any request
            push.disable_monitor()
            self.workers.append(push)
            self.sinks.append(pull)
        self.answers = self.ctx.socket(zmq.PULL)
        self.answers.bind("inproc://tok")
        to_tok = self.ctx.socket(zmq.PUSH)
        to_tok.connect("inproc://tok")
        self.d = KvmulDispatcher(KvmulRouter(N, 1), self.workers, to_tok, vocab_size=VOCAB)

    def delivered(self, expect: int) -> dict[int, list[str]]:
        """What the schedulers received: `expect` messages in all (waits for them, then a little for extras)."""
        out: dict[int, list[str]] = {r: [] for r in range(N)}
        poller = zmq.Poller()
        for sink in self.sinks:
            if not sink.closed:
                poller.register(sink, zmq.POLLIN)
        deadline = time.monotonic() + 10
        while True:
            got = sum(map(len, out.values()))
            ready = dict(poller.poll(200 if got >= expect else 1000))
            if not ready and (got >= expect or time.monotonic() > deadline):
                return out
            for r, sink in enumerate(self.sinks):
                if sink in ready:
                    out[r].append(pickle.loads(sink.recv()).rid)

    def answered(self, expect: int) -> dict[str, tuple[int, str]]:
        out = {}
        while self.answers.poll(200 if len(out) >= expect else 5000):
            msg = pickle.loads(self.answers.recv())
            out[msg.rid] = (msg.finished_reason["status_code"], msg.abort_message)
        return out


@pytest.fixture
def rig(tmp_path):
    r = Rig(tmp_path)
    yield r
    r.ctx.destroy(linger=0)


def test_inputs_that_would_crash_a_rank_are_400s_naming_the_field(rig):
    bad = {
        "neg": request("neg", array("q", [-5, 1, 2])),
        "oov": request("oov", array("q", [1, 2, 10**9])),
        "oov-edge": request("oov-edge", [1, VOCAB]),
        "empty": request("empty", array("q")),
        "none": request("none", None),
        "logprob": request("logprob", [1, 2, 3], return_logprob=True, logprob_start_len=-100),
        "pinned-bad": request("pinned-bad", [-1, 2], routed_dp_rank=1),  # validated before it is sent
    }
    good = {
        "ok": request("ok", array("q", [1, 2, VOCAB - 1])),
        "logprob-ok": request("logprob-ok", [1, 2, 3], return_logprob=True, logprob_start_len=2),
        "logprob-ignored": request("logprob-ignored", [1, 2, 3], return_logprob=False, logprob_start_len=-100),
    }
    for req in [*bad.values(), *good.values()]:
        rig.d.dispatch(req)
    answered, delivered = rig.answered(len(bad)), rig.delivered(len(good))
    assert set(answered) == set(bad) and all(code == 400 for code, _ in answered.values())
    assert "vocabulary [0, 2048)" in answered["oov"][1] and "token id 1000000000" in answered["oov"][1]
    assert "input_ids is empty" in answered["empty"][1] and "input_ids is empty" in answered["none"][1]
    assert "logprob_start_len" in answered["logprob"][1] and "-5" in answered["neg"][1]
    assert sorted(rid for rids in delivered.values() for rid in rids) == sorted(good)


def test_sticky_sessions_pins_and_routing_each_send_once(rig):
    sess = SimpleNamespace(id="chat-1")
    reqs = [request(f"s{i}", [7] * 40 + [i], session_params=sess) for i in range(5)]
    reqs += [request(f"p{i}", [9] * 40 + [i], routed_dp_rank=2) for i in range(3)]
    reqs += [request(f"r{i}", [i + 11] * 40) for i in range(6)]
    for req in reqs:
        rig.d.dispatch(req)
    delivered = rig.delivered(len(reqs))
    counts = Counter(rid for rids in delivered.values() for rid in rids)
    assert set(counts) == {r.rid for r in reqs} and set(counts.values()) == {1} and not rig.answered(0)
    assert sum(all(f"s{i}" in rids for i in range(5)) for rids in delivered.values()) == 1  # one rank
    assert {f"p{i}" for i in range(3)} <= set(delivered[2])


def test_a_rank_whose_scheduler_is_gone_is_taken_down_and_its_requests_answered(rig):
    for i in range(6):
        rig.d.dispatch(request(f"a{i}", [i + 3] * 30))
    before = rig.delivered(6)
    held = before[1]
    assert held  # rank 1 holds some of them
    rig.d.watch_sockets()  # what the controller's loop does on every wake-up
    rig.sinks[1].close(linger=0)  # its scheduler is gone: the socket has no peer any more
    rig.d.watch_sockets(5000)  # waits for ZMQ to report the closed connection
    for i in range(9):
        rig.d.dispatch(request(f"b{i}", [i + 50] * 30))
    rig.d.dispatch(request("pinned-to-dead", [5] * 30, routed_dp_rank=1))
    after = rig.delivered(9)
    answered = rig.answered(len(held) + 1)
    assert rig.d.router.down == [False, True, False] and rig.d.ranks_lost == 1
    assert {f"b{i}" for i in range(9)} == set(after[0]) | set(after[2])  # none lost, none to rank 1
    assert {rid for rid, (code, _) in answered.items() if code == 503} == {*held, "pinned-to-dead"}
    assert "DP rank 1 went down" in answered[held[0]][1]
    rig.d.dispatch(request("health", [0]))  # health checks skip it too
    rig.d.send_health_check(request("hc", [0]))
    assert "hc" in [rid for rids in rig.delivered(2).values() for rid in rids]


def test_with_every_rank_down_requests_are_503s(rig):
    for r in range(N):
        rig.d.rank_down(r, "test")
    rig.d.dispatch(request("late", [1, 2, 3]))
    assert rig.answered(1)["late"][0] == 503
