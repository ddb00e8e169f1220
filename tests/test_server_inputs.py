"""Inputs that kill stock SGLang 0.5.23 are 400s under kvmul, the server keeps serving, the gauges
follow SGLang's load when traffic stops, and the shipped dashboard queries only exported metrics."""

from __future__ import annotations

import json
import random
import re
import time
from pathlib import Path

import pytest
import requests
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from routing_checks import ids

pytestmark = pytest.mark.server
ROOT = Path(__file__).resolve().parent.parent


def _post(server, path: str, body: object) -> requests.Response:
    return requests.post(server.url + path, json=body, timeout=60)


def _still_serves(server, rid: str) -> None:
    resp = server.generate(ids(random.Random(rid), 40), rid=rid, max_new_tokens=2)
    assert resp.status_code == 200, resp.text


@pytest.mark.parametrize(
    "name, body, field",
    [
        ("negative id", {"input_ids": [-5, 1, 2]}, "token id -5"),
        ("negative id, pinned", {"input_ids": [-5, 1, 2], "routed_dp_rank": 1}, "token id -5"),
        ("id past the vocabulary", {"input_ids": [1, 2, 10**9]}, "outside the vocabulary [0, 2048)"),
        ("id past the vocabulary, pinned", {"input_ids": [1, 2048], "routed_dp_rank": 0}, "[0, 2048)"),
        ("logprob_start_len", {"input_ids": [1, 2, 3], "return_logprob": True, "logprob_start_len": -100},
         "logprob_start_len"),
        ("batch with an empty item", {"input_ids": [[1, 2, 3], [], [1, 10**9]]}, None),
    ],
)  # fmt: skip
def test_inputs_that_kill_stock_sglang_are_400s_and_the_server_lives(kvmul_server, name, body, field):
    resp = _post(kvmul_server, "/generate", {**body, "sampling_params": {"max_new_tokens": 2}})
    assert resp.status_code == 400, (name, resp.status_code, resp.text)
    if field is not None:
        assert field in resp.text, resp.text
    _still_serves(kvmul_server, f"after-{name}")


_json = st.recursive(
    st.none() | st.booleans() | st.integers(-(2**40), 2**40) | st.floats(allow_nan=False) | st.text(max_size=8),
    lambda children: st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=6), children, max_size=4),
    max_leaves=12,
)
_ids = st.lists(st.integers(-3, 2100), max_size=12) | st.lists(st.lists(st.integers(-3, 2100), max_size=5), max_size=3)
_generate = st.fixed_dictionaries(
    {"input_ids": _ids},
    optional={
        "sampling_params": st.fixed_dictionaries(
            {}, optional={"max_new_tokens": st.integers(-2, 4), "temperature": st.floats(-1, 3), "stop": _json}
        ),
        "return_logprob": st.booleans(),
        "logprob_start_len": st.integers(-200, 20),
        "routed_dp_rank": st.integers(-2, 3),
        "rid": st.text(max_size=4),
        "stream": st.booleans(),
    },
)
_openai = st.fixed_dictionaries(
    {"model": st.just("default")},
    optional={
        "prompt": st.text(max_size=20) | _ids,
        "max_tokens": st.integers(-2, 4),
        "logprobs": st.integers(-2, 3) | st.booleans(),
        "n": st.integers(0, 3),
        "messages": st.lists(st.fixed_dictionaries({"role": st.sampled_from(["user", "x"]), "content": _json})),
    },
)


@settings(max_examples=60, deadline=None, suppress_health_check=list(HealthCheck), derandomize=True)
@given(path_body=st.one_of(
    st.tuples(st.just("/generate"), _generate),
    st.tuples(st.sampled_from(["/v1/completions", "/v1/chat/completions"]), _openai),
    st.tuples(st.sampled_from(["/generate", "/v1/completions"]), _json),
))  # fmt: skip
def test_random_bodies_never_take_the_server_down(kvmul_server, path_body):
    """Any answer is allowed (SGLang's own HTTP layer answers some of these with a 500, e.g. an
    OpenAI completion with n=0 and token-id prompts), but afterwards the server must still serve."""
    path, body = path_body
    _post(kvmul_server, path, body)
    _still_serves(kvmul_server, "fuzz-probe")


def test_gauges_follow_the_load_snapshots_when_traffic_stops(kvmul_server):
    rng = random.Random(11)
    for i in range(4):
        assert kvmul_server.generate(ids(rng, 200), rid=f"gauge-{i}", max_new_tokens=4).status_code == 200
    deadline = time.monotonic() + 20  # the ranks publish an idle snapshot; the controller reads it unprompted
    while True:
        batch = kvmul_server.metric("kvmul_batch_size")
        queued = kvmul_server.metric("kvmul_queued_uncached_tokens")
        inflight = kvmul_server.metric("kvmul_inflight_prompts")
        if set(batch.values()) == set(queued.values()) == set(inflight.values()) == {0.0}:
            break
        assert time.monotonic() < deadline, (batch, queued, inflight)


def test_the_dashboard_queries_only_exported_metrics(kvmul_server):
    dash = json.loads((ROOT / "launch" / "grafana-kvmul.json").read_text())
    queried = {m for p in dash["panels"] for t in p["targets"] for m in re.findall(r"kvmul_[a-z_]+", t["expr"])}
    text = requests.get(kvmul_server.metrics_url, timeout=10).text
    exported = set(re.findall(r"^# TYPE (kvmul_[a-z_]+) (\w+)", text, re.M))
    names = {n for n, _ in exported} | {f"{n}_total" for n, kind in exported if kind == "counter"}
    assert len(queried) >= 10 and queried <= names, sorted(queried - names)
