"""One settings object from the launcher to the controller, and the launcher's own port checks."""

import dataclasses
import socket

import pytest

from sglang_kvmul.launch.args import split_own_flags, with_kvmul_defaults
from sglang_kvmul.launch.server import prepare
from sglang_kvmul.serving.settings import KvmulSettings
from sglang_kvmul.sim.cost import FITTED, PROFILES


def test_settings_round_trip_through_the_environment():
    s = KvmulSettings(policy="linear:0.5", metrics_port=9100, decision_log="/tmp/d.jsonl", poll_all_methods=True)
    env = s.to_env()
    assert env["SGLANG_KVMUL_POLICY"] == "linear:0.5" and env["SGLANG_KVMUL_POLL_ALL_METHODS"] == "1"
    assert "SGLANG_KVMUL_SLICE_BATCHES" not in env  # defaults are not written
    assert KvmulSettings.from_env(env) == s
    assert KvmulSettings.from_env({}) == KvmulSettings()


def test_malformed_settings_are_clear_errors():
    with pytest.raises(ValueError, match="SGLANG_KVMUL_METRICS_PORT='abc' is not a valid int"):
        KvmulSettings.from_env({"SGLANG_KVMUL_METRICS_PORT": "abc"})
    with pytest.raises(ValueError, match="linear:<alpha> needs a number"):
        split_own_flags(["--kvmul-policy", "linear:abc"])
    with pytest.raises(ValueError, match="slice_batches must be >= 1"):
        KvmulSettings(slice_batches=0).validate()


def test_the_flags_override_the_environment(monkeypatch):
    monkeypatch.setenv("SGLANG_KVMUL_POLICY", "cache_only")
    monkeypatch.setenv("SGLANG_KVMUL_DECISION_LOG", "/tmp/x")
    rest, s = split_own_flags(["--model-path", "m", "--kvmul-policy", "kvmul_guard", "--kvmul-metrics-port", "9"])
    assert rest == ["--model-path", "m"] and s.policy == "kvmul_guard" and s.metrics_port == 9
    assert s.decision_log == "/tmp/x"


def test_a_taken_metrics_port_is_refused_before_sglang_starts():
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        with pytest.raises(SystemExit, match=f"--kvmul-metrics-port {port} is already in use"):
            prepare(["--model-path", "m", "--dp-size", "2", "--kvmul-metrics-port", str(port)])


def test_kv_event_ports_avoid_our_own_ports():
    seen = []

    def fake_free(n, avoid):  # records what the launcher asks to avoid
        seen.append(set(avoid))
        return 20000 + 10 * len(seen)

    with_kvmul_defaults(["--dp-size", "2"], cuda=False, free_port_range=fake_free, avoid={9100})
    assert all(9100 in avoid for avoid in seen) and {20010, 20011} <= seen[1]


def test_cost_profiles_carry_their_pool_and_the_cpu_fit_comes_from_its_json():
    import json

    for name, p in PROFILES.items():
        assert p.kv_tokens > 0 and p.kv_dtype in ("bf16", "fp16", "fp8"), name
    fit = json.loads((FITTED / "cpu-bench.json").read_text())["fit"]
    cost = PROFILES["cpu-bench"].cost
    assert (
        cost.prefill_token_s == fit["prefill"]["per_token_s"]
        and cost.decode_ctx_s == fit["decode"]["per_context_token_s"]
        and cost.attn_whole_sequence is fit["prefill"]["attn_whole_sequence"]
    )
    assert PROFILES["cpu-bench"].measured and not PROFILES["h100-qwen2.5-7b"].measured


def test_the_saved_cpu_samples_refit_to_the_saved_profile():
    """`fit_cpu_cost`'s fit is a pure function of its samples: the committed samples give the
    committed `cpu-bench` profile, attention model included (no hand-copied numbers)."""
    import json

    from benchmarks.common import RESULTS
    from benchmarks.fit_cpu_cost import MODEL_NAME, fit_samples

    report = json.loads((RESULTS / "sim" / "cpu_cost_fit.json").read_text())
    fit, costs, errors = fit_samples(
        report["prefill_samples"], report["cached_prefill_samples"], report["decode_samples"]
    )
    saved = json.loads((FITTED / "cpu-bench.json").read_text())["fit"]
    # to 1e-6, not bit for bit: the small per-request decode slope is ill-conditioned, and another
    # CPU's BLAS moves it by ~5e-9 (AMD EPYC against the machine that fitted it); a hand-copied or
    # stale number is off by far more
    for part, terms in saved.items():
        assert fit[part] == pytest.approx(terms, rel=1e-6, abs=0), part
    whole = saved["prefill"]["attn_whole_sequence"]
    assert errors[whole] < errors[not whole]
    refit = dataclasses.asdict(costs[MODEL_NAME[whole]])
    assert refit == pytest.approx(dataclasses.asdict(PROFILES["cpu-bench"].cost), rel=1e-6, abs=0)
