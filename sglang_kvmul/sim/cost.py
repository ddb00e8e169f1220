"""Step-time models for the simulator: how long a prefill batch or a decode step takes.

`LinearCost`: fixed per-step overheads, a per-token cost, an attention term growing with the
context each new token attends to, per-request and per-context decode costs. Its defaults are
illustrative round numbers; `cpu-bench` is fitted (see PROFILES). `RooflineCost`: GPU shapes from
FLOPs and bytes, unmeasured.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

FITTED = Path(__file__).parent / "fitted"  # fits written by benchmarks/fit_cpu_cost.py
KV_BYTES = {"bf16": 2, "fp16": 2, "fp8": 1}


class CostModel(Protocol):
    def prefill_s(self, new_tokens: int, cached_context: int, requests: int) -> float: ...

    def decode_s(self, batch: int, total_context: int) -> float: ...


@dataclass(frozen=True)
class LinearCost:
    prefill_fixed_s: float = 0.005  # per prefill step: scheduling, launch (and, when fitted from TTFT, the HTTP path)
    prefill_token_s: float = 50e-6  # per new prompt token (linear layers)
    attn_token_ctx_s: float = 2e-9  # per (new token x context token it attends to)
    decode_step_s: float = 0.005  # per decode step
    decode_req_s: float = 0.2e-3  # per running request per decode step
    decode_ctx_s: float = 5e-9  # per context token read per decode step (KV bandwidth)
    # SGLang's torch_native attention (the CPU server's) pads each request's query over its cached
    # prefix (`_run_sdpa_forward_extend`): a prefill's attention costs as if the prefix were new
    attn_whole_sequence: bool = False

    def prefill_s(self, new_tokens: int, cached_context: int, requests: int) -> float:
        """`cached_context` is summed over the batch; attention is priced per request, at the mean."""
        per = max(1, requests)
        if self.attn_whole_sequence:
            attn = per * ((cached_context + new_tokens) / per) ** 2 / 2
        else:
            attn = new_tokens * (cached_context + new_tokens / 2) / per
        return self.prefill_fixed_s + self.prefill_token_s * new_tokens + self.attn_token_ctx_s * attn

    def decode_s(self, batch: int, total_context: int) -> float:
        return self.decode_step_s + self.decode_req_s * batch + self.decode_ctx_s * total_context


@dataclass(frozen=True)
class ScaledCost:
    """Another model's step times divided by `speed`: a slower (or faster) card in a mixed fleet, or
    a fitted profile on another machine (`decode_speed`, when given, for decode steps)."""

    base: CostModel
    speed: float
    decode_speed: float | None = None

    def prefill_s(self, new_tokens: int, cached_context: int, requests: int) -> float:
        return self.base.prefill_s(new_tokens, cached_context, requests) / self.speed

    def decode_s(self, batch: int, total_context: int) -> float:
        return self.base.decode_s(batch, total_context) / (self.decode_speed or self.speed)


@dataclass(frozen=True)
class SharedCores:
    """Ranks that share CPU cores, as the CPU test server's two ranks do (GPUs do not): a step runs
    slower while another rank is busy. Each factor is a step's time with one other rank busy over
    its time alone, by the kind of this step and the other's (`benchmarks/cpu_contention.py`
    measures all four). Several busy ranks add their excess."""

    prefill_with_prefill: float
    prefill_with_decode: float
    decode_with_decode: float
    decode_with_prefill: float

    def slowdown(self, prefill: bool, others_prefilling: int, others_decoding: int) -> float:
        with_p, with_d = (
            (self.prefill_with_prefill, self.prefill_with_decode)
            if prefill
            else (self.decode_with_prefill, self.decode_with_decode)
        )
        return 1.0 + others_prefilling * (with_p - 1.0) + others_decoding * (with_d - 1.0)


@dataclass(frozen=True)
class ModelShape:
    layers: int
    hidden: int
    heads: int
    kv_heads: int
    head_dim: int
    active_params: float  # parameters used per token (all, for a dense model)
    total_params: float
    experts: int = 0  # MoE: routed experts per layer, experts chosen per token, params per expert
    experts_per_token: int = 0
    expert_params: float = 0.0

    def kv_bytes_per_token(self, kv_dtype: str = "bf16") -> int:
        return 2 * self.layers * self.kv_heads * self.head_dim * KV_BYTES[kv_dtype]  # K and V


# Shapes from the models' public configs (Qwen2.5-7B-Instruct, Qwen3-30B-A3B).
QWEN25_7B = ModelShape(
    layers=28, hidden=3584, heads=28, kv_heads=4, head_dim=128, active_params=7.6e9, total_params=7.6e9
)
QWEN3_30B_A3B = ModelShape(
    layers=48, hidden=2048, heads=32, kv_heads=4, head_dim=128, active_params=3.3e9, total_params=30.5e9,
    experts=128, experts_per_token=8, expert_params=3 * 2048 * 768,
)  # fmt: skip


@dataclass(frozen=True)
class RooflineCost:
    """Step time from FLOPs and bytes on an H100-class card (989 TFLOP/s bf16 dense, 3.35 TB/s).

    UNMEASURED: the efficiency factors are assumptions (no GPU was available to fit them): prefill
    reaches `mfu` of peak FLOPs; decode moves weights and KV at `bw_eff` of peak bandwidth, or is
    FLOP-bound at `mfu` for large batches; `step_s` is the scheduler's per-step CPU overhead.
    """

    model: ModelShape
    peak_flops: float = 989e12
    peak_bw: float = 3.35e12
    mfu: float = 0.5
    bw_eff: float = 0.7
    step_s: float = 0.002
    kv_dtype: str = "bf16"  # what decode reads per context token

    def _attn_flops(self, new_tokens: int, context: float) -> float:
        m = self.model
        return 4 * m.layers * m.heads * m.head_dim * new_tokens * context  # QK^T and AV

    def prefill_s(self, new_tokens: int, cached_context: int, requests: int) -> float:
        ctx = cached_context / max(1, requests) + new_tokens / max(1, requests) / 2  # per-request mean
        flops = 2 * self.model.active_params * new_tokens + self._attn_flops(new_tokens, ctx)
        return self.step_s + flops / (self.peak_flops * self.mfu)

    def _weight_bytes(self, batch: int) -> float:
        m = self.model
        if not m.experts:
            return 2 * m.total_params
        # experts touched by `batch` tokens (uniform routing), per layer
        touched = m.experts * (1 - (1 - m.experts_per_token / m.experts) ** batch)
        dense = m.total_params - m.layers * m.experts * m.expert_params
        return 2 * (dense + m.layers * touched * m.expert_params)

    def decode_s(self, batch: int, total_context: int) -> float:
        m = self.model
        bytes_moved = self._weight_bytes(batch) + total_context * m.kv_bytes_per_token(self.kv_dtype)
        flops = 2 * m.active_params * batch + self._attn_flops(batch, total_context / max(1, batch))
        return self.step_s + max(bytes_moved / (self.peak_bw * self.bw_eff), flops / (self.peak_flops * self.mfu))


@dataclass(frozen=True)
class Profile:
    """A simulated rank: its step times, and the KV pool it serves from (tokens, element type), so a
    run needs no hand-passed pool size. `measured` says whether `cost` was fitted to real step times."""

    cost: CostModel
    kv_tokens: int
    kv_dtype: str
    measured: bool
    note: str


def fitted_linear(name: str, note: str) -> Profile:
    """A `LinearCost` profile from its fit's JSON (written by the fitting benchmark)."""
    doc = json.loads((FITTED / f"{name}.json").read_text())
    pre, dec = doc["fit"]["prefill"], doc["fit"]["decode"]
    cost = LinearCost(
        prefill_fixed_s=pre["fixed_s"], prefill_token_s=pre["per_token_s"], attn_token_ctx_s=pre["attn_token_ctx_s"],
        decode_step_s=dec["step_s"], decode_req_s=dec["per_request_s"], decode_ctx_s=dec["per_context_token_s"],
        attn_whole_sequence=pre.get("attn_whole_sequence", False),
    )  # fmt: skip
    return Profile(cost, doc["kv_tokens"], doc["kv_dtype"], True, note)


PROFILES: dict[str, Profile] = {
    # Fitted by benchmarks/fit_cpu_cost.py to the real CPU SGLang server, built-in `bench` model
    # (the one every CPU benchmark here serves), one rank on one core; fit within ~5% of every
    # measured point (benchmarks/results/sim/cpu_cost_fit.md). The "tiny" shape is too small for
    # prefix hits to matter on CPU, so the fit uses the model the comparisons use.
    "cpu-bench": fitted_linear("cpu-bench", "CPU server, bench model (fitted)"),
    # bf16 weights (15 GB) on an 80 GB card leave ~1M bf16 KV tokens (57 KB/token) at 0.9 memory use
    "h100-qwen2.5-7b": Profile(RooflineCost(QWEN25_7B), 1_000_000, "bf16", False, "H100, Qwen2.5-7B roofline"),
    # bf16 weights (61 GB) leave ~11 GB: ~220k tokens of FP8 KV (48 KB/token)
    "h100-qwen3-30b-a3b": Profile(
        RooflineCost(QWEN3_30B_A3B, kv_dtype="fp8"), 220_000, "fp8", False, "H100, Qwen3-30B-A3B roofline"
    ),
    "illustrative": Profile(LinearCost(), 65_536, "bf16", False, "round numbers"),
}
