"""Attention DP on one node (`--tp 2 --attn-dp-size 2`, tiny Qwen3 on CPU): the launcher makes kvmul
the default (no --load-balance-method given), shared prefixes stick, unrelated prompts spread, and
the predicted cached tokens equal SGLang's for sequential requests."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import requests
from conftest import _server
from routing_checks import (
    check_predicted_cached_tokens_equal_sglang_reported,
    check_shared_prefixes_stick_and_unrelated_prompts_spread,
)

from sglang_kvmul.core.rules import DEFAULT_RULE
from sglang_kvmul.harness.tiny_model import build

pytestmark = pytest.mark.server


@pytest.fixture(scope="module")
def attn_dp_server(tmp_path_factory: pytest.TempPathFactory):
    model: Path = build("tiny-qwen3")
    yield from _server(tmp_path_factory.mktemp("attn-dp"), model, [], shape=("--tp-size", "2", "--attn-dp-size", "2"))


def test_kvmul_is_the_default_for_attention_dp(attn_dp_server):
    info = requests.get(attn_dp_server.url + "/server_info", timeout=10).json()
    assert info["load_balance_method"] == "kvmul" and info["attn_dp_size"] == 2 and info["dp_size"] == 1
    log = attn_dp_server.server.log_path.read_text()
    assert f"rule {DEFAULT_RULE}, 2 DP ranks" in log
    # SGLang divides chunked_prefill_size by the attention-DP size (and logs it); the router reads
    # the divided one, the chunk each rank's scheduler takes
    chunk = attn_dp_server.metric_total("kvmul_prefill_chunk_tokens")
    adjusted = re.search(r"chunked prefill size is adjusted from (\d+) to (\d+)", log)
    assert adjusted, "SGLang did not log its attention-DP chunk adjustment"
    assert chunk == int(adjusted[2]) == int(adjusted[1]) // 2 == info["chunked_prefill_size"], (chunk, adjusted[0])


def test_attention_dp_shared_prefixes_stick_and_unrelated_prompts_spread(attn_dp_server):
    check_shared_prefixes_stick_and_unrelated_prompts_spread(attn_dp_server, tag="attn-spread")


def test_attention_dp_predictions_equal_sglang_reported(attn_dp_server):
    check_predicted_cached_tokens_equal_sglang_reported(attn_dp_server, tag="attn-exact")
