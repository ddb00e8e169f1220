"""The upstream patch: current, applies to the pinned release, and routes without our plugin."""

from __future__ import annotations

import importlib.metadata
import os
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
import requests
from conftest import Server
from routing_checks import (
    check_predicted_cached_tokens_equal_sglang_reported,
    check_shared_prefixes_stick_and_unrelated_prompts_spread,
)

from sglang_kvmul.core.rules import DEFAULT_RULE
from sglang_kvmul.cpu_compat import cpu_env
from sglang_kvmul.harness.local_server import cpu_server_args, running_server
from sglang_kvmul.launch.args import kv_events_config
from sglang_kvmul.launch.ports import free_port_range
from sglang_kvmul.serving.settings import KvmulSettings

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "patches"))
import make_patch  # noqa: E402

PATCH = make_patch.PATCH


def test_committed_patch_is_current():
    assert PATCH.read_text() == make_patch.build_patch(), "run: python patches/make_patch.py"


def _release_tree(dest: Path, files: list[str]) -> None:
    """`files` of the pinned release (verified against its wheel's RECORD) under dest/python/."""
    for rel in files:
        out = dest / "python" / rel
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(make_patch.pristine(rel))


def test_patch_applies_cleanly_to_the_pinned_release(tmp_path):
    _release_tree(tmp_path, list(make_patch.EDITS))
    proc = subprocess.run(["git", "apply", "--check", "-v", str(PATCH)], cwd=tmp_path, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    subprocess.run(["git", "apply", str(PATCH)], cwd=tmp_path, check=True)
    dpc = (tmp_path / "python/sglang/srt/managers/data_parallel_controller.py").read_text()
    assert "KVMUL = auto()" in dpc and "KvmulDataParallelController as controller_cls" in dpc
    assert (tmp_path / "python/sglang/srt/managers/kvmul/core/router.py").exists()
    assert not (tmp_path / "python/sglang/srt/managers/kvmul/serving/plugin.py").exists()
    # the publisher installs the KV-event guard and, across nodes, its own registration with node 0
    # (the module the launcher's two-node test runs through the plugin)
    kv_events = (tmp_path / "python/sglang/srt/disaggregation/kv_events.py").read_text()
    assert "_kvmul_event_privacy.install_from_env()" in kv_events
    assert "_kvmul_event_registration.install()" in kv_events
    assert (tmp_path / "python/sglang/srt/managers/kvmul/serving/event_registration.py").exists()


@pytest.fixture(scope="module")
def patched_server(tmp_path_factory, tiny_model) -> Iterator[Server]:
    """Stock `python -m sglang.launch_server` from a patched copy of SGLang, our plugin NOT loaded.

    The copy is an installed SGLang's site-packages layout, patched with the command that
    patches/README.md documents for a virtualenv (`patch -p2 -d "$SITE"`).
    """
    tmp = tmp_path_factory.mktemp("patched")
    site = Path(str(importlib.metadata.distribution("sglang").locate_file("")))
    shutil.copytree(site / "sglang", tmp / "site" / "sglang", ignore=shutil.ignore_patterns("__pycache__"))
    with open(PATCH) as patch_input:
        subprocess.run(["patch", "-p2", "-d", str(tmp / "site")], stdin=patch_input, check=True, capture_output=True)
    pub = free_port_range(2)
    replay = free_port_range(2, set(range(pub, pub + 2)))
    log = tmp / "decisions.jsonl"
    env = cpu_env(2)
    env["PYTHONPATH"] = os.pathsep.join([str(tmp / "site"), env.get("PYTHONPATH", os.environ.get("PYTHONPATH", ""))])
    env["SGLANG_PLUGINS"] = "no-such-plugin"  # a whitelist that excludes our `kvmul` entry point
    env.update(KvmulSettings(decision_log=str(log), event_peers="127.0.0.1").to_env())
    args = ["--dp-size", "2", "--load-balance-method", "kvmul", "--kv-events-config", kv_events_config(pub, replay)]
    args += cpu_server_args(16384)
    with running_server(tiny_model, args, tmp / "server.log", launcher="sglang.launch_server", env=env) as srv:
        yield Server(srv, log, metrics_port=0)


@pytest.mark.server
def test_patched_sglang_routes_by_kvmul_without_the_plugin(patched_server):
    log = patched_server.server.log_path.read_text()
    assert "Loaded plugin kvmul" not in log
    # the controller that routes is the patched-in module, not the installed sglang_kvmul package
    assert f"kvmul (sglang.srt.managers.kvmul.serving.controller): rule {DEFAULT_RULE}, 2 DP ranks" in log
    assert "kvmul: KV-event sockets accept only 127.0.0.1" in log  # the patched publisher's guard
    info = requests.get(patched_server.url + "/server_info", timeout=10).json()
    assert info["load_balance_method"] == "kvmul"
    check_shared_prefixes_stick_and_unrelated_prompts_spread(patched_server, tag="patched-spread")
    check_predicted_cached_tokens_equal_sglang_reported(patched_server, tag="patched-exact")
