"""launch/ recipes: the CPU one really runs here; the GPU one is checked by SGLang's own parser."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import requests

from sglang_kvmul.harness.local_server import running_server
from sglang_kvmul.launch.args import split_own_flags, with_kvmul_defaults
from sglang_kvmul.launch.ports import free_port_range

ROOT = Path(__file__).resolve().parent.parent
LAUNCHER = ["python", "-m", "sglang_kvmul.launch_server"]


def dry_run(recipe: str, **env: str) -> list[str]:
    out = subprocess.run(
        ["bash", str(ROOT / "launch" / recipe)],
        env={**os.environ, "KVMUL_DRY_RUN": "1", "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}", **env},
        capture_output=True,
        text=True,
        check=True,
    ).stdout.splitlines()
    assert out[:3] == LAUNCHER, out
    return out[3:]


def test_gpu_recipe_flags_are_valid_for_sglang():
    from sglang.srt.plugins import load_plugins
    from sglang.srt.server_args import prepare_server_args

    argv, settings = split_own_flags(dry_run("gpu-1node-8gpu.sh", MODEL="/models/qwen2.5-7b"))
    assert settings.to_env() == {"SGLANG_KVMUL_METRICS_PORT": "30100"}
    final = with_kvmul_defaults(
        argv, cuda=True, free_port_range=lambda n, avoid: 15000 if not avoid - {30000} else 15100
    )
    load_plugins()
    args = prepare_server_args(final)  # SGLang's own parser: an invalid flag or choice exits
    assert args.dp_size == 8 and args.load_balance_method == "kvmul"
    assert args.attention_backend == "flashinfer" and args.page_size == 16
    assert args.enable_metrics and args.host == "127.0.0.1"
    assert '"endpoint": "tcp://127.0.0.1:15000"' in args.kv_events_config


@pytest.mark.server
def test_cpu_recipe_serves_with_kvmul(tiny_model, tmp_path):
    path = os.pathsep.join([str(Path(sys.executable).parent), os.environ["PATH"]])
    cmd = ["bash", str(ROOT / "launch" / "cpu-demo.sh")]
    env = {"PATH": path, "KVMUL_METRICS_PORT": str(free_port_range(1))}
    with running_server(tiny_model, [], tmp_path / "server.log", command=cmd, env=env) as s:
        info = requests.get(s.url + "/server_info", timeout=10).json()
        assert info["load_balance_method"] == "kvmul" and info["dp_size"] == 2
        body = {"input_ids": list(range(5, 105)), "sampling_params": {"max_new_tokens": 4}}
        assert requests.post(s.url + "/generate", json=body, timeout=120).status_code == 200


def test_two_node_recipe_flags_are_valid_for_sglang():
    from sglang.srt.plugins import load_plugins
    from sglang.srt.server_args import prepare_server_args

    from sglang_kvmul.launch.args import cluster_of

    argv, _ = split_own_flags(
        dry_run("gpu-2node-attn-dp.sh", MODEL="/models/qwen3-30b-a3b", DIST_INIT_ADDR="10.0.0.1:25000", NODE_RANK="1")
    )
    cluster = cluster_of(argv)
    assert cluster is not None and cluster.nnodes == 2 and cluster.node_rank == 1 and cluster.ranks == 16
    final = with_kvmul_defaults(argv, cuda=True, free_port_range=lambda n, avoid: 0, node_addr="10.0.0.2")
    load_plugins()
    args = prepare_server_args(final)  # SGLang's own parser: an invalid flag or choice exits
    assert args.attn_dp_size == 16 and args.nnodes == 2 and args.load_balance_method == "kvmul"
    pub, replay, _ = cluster.ports
    assert f'"endpoint": "tcp://10.0.0.2:{pub}"' in args.kv_events_config  # node 1's own address
    assert f'"replay_endpoint": "tcp://10.0.0.2:{replay}"' in args.kv_events_config and pub == 26000
