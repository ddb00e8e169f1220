import json

from sglang_kvmul.cpu_compat import cpu_env, omp_threads_bind
from sglang_kvmul.launch.args import with_kvmul_defaults


def fixed_ports(n, avoid):
    """Publisher range first (avoiding only the HTTP port), then the replay range."""
    assert 30000 in avoid  # the default HTTP port is never handed out
    return 40000 if len(avoid) == 1 else 41000


def test_kvmul_is_default_for_dp_above_one_with_loopback_events():
    out = with_kvmul_defaults(["--model-path", "m", "--dp-size", "4"], cuda=False, free_port_range=fixed_ports)
    assert out[out.index("--load-balance-method") + 1] == "kvmul"
    cfg = json.loads(out[out.index("--kv-events-config") + 1])
    assert cfg["endpoint"] == "tcp://127.0.0.1:40000" and cfg["bind"] is True
    assert cfg["replay_endpoint"] == "tcp://127.0.0.1:41000"  # not inside the 4 publisher ports
    assert "--attention-backend" not in out


def test_user_flags_win():
    argv = ["--dp-size=2", "--load-balance-method", "round_robin"]
    assert with_kvmul_defaults(argv, cuda=False, free_port_range=fixed_ports) == argv
    argv = ["--dp-size", "2", "--kv-events-config", "{}", "--attention-backend", "fa3"]
    out = with_kvmul_defaults(argv, cuda=True, free_port_range=fixed_ports)
    assert out == [*argv, "--load-balance-method", "kvmul"]


def test_single_rank_is_untouched_and_cuda_gets_flashinfer():
    assert with_kvmul_defaults(["--model-path", "m"], cuda=False, free_port_range=fixed_ports) == ["--model-path", "m"]
    out = with_kvmul_defaults(["--model-path", "m"], cuda=True, free_port_range=fixed_ports)
    assert out[-2:] == ["--attention-backend", "flashinfer"]
    out = with_kvmul_defaults(["--device", "cpu"], cuda=True, free_port_range=fixed_ports)
    assert "--attention-backend" not in out


def test_cpu_env_and_core_groups():
    assert omp_threads_bind(2, 2) == "0|1"
    assert omp_threads_bind(2, 16) == "0-7|8-15"
    env = cpu_env(2, environ={"SGLANG_CPU_OMP_THREADS_BIND": "5|6"})
    assert env["SGLANG_USE_CPU_ENGINE"] == "1" and "SGLANG_CPU_OMP_THREADS_BIND" not in env


def test_attention_dp_counts_the_controller_ranks_and_gets_kvmul():
    from sglang_kvmul.launch.args import controller_ranks, scheduler_processes

    assert controller_ranks(["--tp", "2", "--attn-dp-size", "2"]) == 2
    assert controller_ranks(["--dp-size", "4", "--enable-dp-attention", "--tp-size", "4"]) == 4  # old spelling
    assert controller_ranks(["--dp-size", "2"]) == 2 and controller_ranks(["--tp-size", "8"]) == 1
    assert scheduler_processes(["--tp-size", "2", "--attn-dp-size", "2"]) == 2  # DP ranks share the TP group
    assert scheduler_processes(["--dp-size", "2", "--tp-size", "2"]) == 4
    out = with_kvmul_defaults(["--tp-size", "4", "--attn-dp-size", "4"], cuda=False, free_port_range=fixed_ports)
    assert out[out.index("--load-balance-method") + 1] == "kvmul" and "--kv-events-config" in out
    assert "--load-balance-method" not in with_kvmul_defaults(
        ["--tp-size", "4"], cuda=False, free_port_range=fixed_ports
    )
