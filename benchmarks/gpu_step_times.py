"""Measure forward-step times of the simulator's GPU model shapes with random weights (needs CUDA).

Why: the simulator's GPU profiles (`sglang_kvmul/sim/cost.py`) are rooflines with efficiency
factors; this measures what those factors are on a real card. No checkpoint is needed (nothing can
be downloaded there): each shape's layer is built from its public config with random bf16 weights.

What one step is, per shape (Qwen2.5-7B dense, Qwen3-30B-A3B MoE):
  * `LAYERS_HELD` distinct decoder layers (so weights and KV do not sit in L2 between layers), timed
    in sequence and scaled to the model's layer count, plus the LM head on the sampled rows (timed
    alone);
  * a layer = RMSNorm, QKV projection, attention over the KV cache (PyTorch SDPA: the flash kernel
    where it accepts the shapes), output projection, RMSNorm, MLP (dense: gate/up + SiLU + down
    with cuBLAS; MoE: top-k router, tokens sorted by expert, `torch._grouped_mm` for the experts,
    weighted combine). Rotary embedding and Qwen3's q/k norms are left out (elementwise, small).
  * prefill (SGLang's extend): one request of T new tokens after C cached ones, eager PyTorch, as
    SGLang runs extend batches;
  * decode: B requests of context L each, one new token each, replayed from a CUDA graph, as SGLang
    runs decode batches.
These are PyTorch's kernels, not SGLang's (FlashInfer/FA3, fused MoE Triton kernels): the factors
fitted from them are for that kernel set, which the closing notes say.

Writes JSON (one row per measured point) to the path given. No fitting script exists yet: fitting
the roofline factors to these rows (and a GPU to measure them on) are still to come.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F

LAYERS_HELD = 4
DEVICE = "cuda"


@dataclass(frozen=True)
class Shape:
    name: str
    layers: int
    hidden: int
    heads: int
    kv_heads: int
    head_dim: int
    vocab: int
    intermediate: int = 0  # dense MLP
    experts: int = 0  # MoE
    top_k: int = 0
    moe_intermediate: int = 0


SHAPES = {
    "qwen2.5-7b": Shape("qwen2.5-7b", 28, 3584, 28, 4, 128, 152064, intermediate=18944),
    "qwen3-30b-a3b": Shape("qwen3-30b-a3b", 48, 2048, 32, 4, 128, 151936, experts=128, top_k=8, moe_intermediate=768),
}


def _w(*shape: int) -> torch.Tensor:
    return torch.randn(*shape, device=DEVICE, dtype=torch.bfloat16) * 0.02


class Layer:
    """One decoder layer's weights and forward (random weights, bf16)."""

    def __init__(self, s: Shape) -> None:
        self.s = s
        self.qkv = _w((s.heads + 2 * s.kv_heads) * s.head_dim, s.hidden)
        self.o = _w(s.hidden, s.heads * s.head_dim)
        self.norm = torch.ones(s.hidden, device=DEVICE, dtype=torch.bfloat16)
        if s.experts:
            self.router = _w(s.experts, s.hidden)
            # (E, N, K) stored, used transposed: the layout the grouped GEMM wants for its B operand
            self.w13 = _w(s.experts, 2 * s.moe_intermediate, s.hidden)
            self.w2 = _w(s.experts, s.hidden, s.moe_intermediate)
        else:
            self.gate_up = _w(2 * s.intermediate, s.hidden)
            self.down = _w(s.hidden, s.intermediate)

    def mlp(self, x: torch.Tensor) -> torch.Tensor:
        s = self.s
        if not s.experts:
            g, u = (x @ self.gate_up.t()).chunk(2, dim=-1)
            return (F.silu(g) * u) @ self.down.t()
        logits = x @ self.router.t()
        weights, experts = torch.topk(torch.softmax(logits.float(), dim=-1), s.top_k, dim=-1)
        flat = experts.reshape(-1)
        order = torch.argsort(flat)
        token_of = order // s.top_k
        counts = torch.zeros(s.experts, device=DEVICE, dtype=torch.int32)
        counts.scatter_add_(0, flat, torch.ones_like(flat, dtype=torch.int32))
        offs = torch.cumsum(counts, 0, dtype=torch.int32)
        xs = x[token_of]
        h = torch._grouped_mm(xs, self.w13.transpose(-2, -1), offs=offs)
        g, u = h.chunk(2, dim=-1)
        y = torch._grouped_mm((F.silu(g) * u).contiguous(), self.w2.transpose(-2, -1), offs=offs)
        y = y * weights.reshape(-1)[order].unsqueeze(-1).to(y.dtype)
        return torch.zeros_like(x).index_add_(0, token_of, y)

    def attend_prefill(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        # q (1, H, T, D); k, v (1, Hkv, C+T, D): causal aligned to the end (the new tokens come last)
        from torch.nn.attention.bias import causal_lower_right

        mask = causal_lower_right(q.shape[2], k.shape[2])
        try:
            return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=True)
        except (RuntimeError, TypeError):
            rep = q.shape[1] // k.shape[1]
            return F.scaled_dot_product_attention(
                q, k.repeat_interleave(rep, 1), v.repeat_interleave(rep, 1), attn_mask=mask
            )

    def forward(self, x: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, decode: bool) -> torch.Tensor:
        s = self.s
        h = F.rms_norm(x, (s.hidden,), self.norm)
        qkv = h @ self.qkv.t()
        n = x.shape[0]
        q, k, v = qkv.split([s.heads * s.head_dim, s.kv_heads * s.head_dim, s.kv_heads * s.head_dim], dim=-1)
        if decode:
            # B requests, one query each: fold the query heads of a KV group into the query length
            # (all of them attend the whole context, so no mask): GQA without copying K/V
            b = n
            k_cache[:, :, -1] = k.view(b, s.kv_heads, s.head_dim)
            v_cache[:, :, -1] = v.view(b, s.kv_heads, s.head_dim)
            qg = q.view(b, s.kv_heads, s.heads // s.kv_heads, s.head_dim)
            a = F.scaled_dot_product_attention(qg, k_cache, v_cache).reshape(b, -1)
        else:
            t = n
            k_cache[:, -t:] = k.view(t, s.kv_heads, s.head_dim).transpose(0, 1)
            v_cache[:, -t:] = v.view(t, s.kv_heads, s.head_dim).transpose(0, 1)
            qh = q.view(t, s.heads, s.head_dim).transpose(0, 1).unsqueeze(0)
            a = self.attend_prefill(qh, k_cache.unsqueeze(0), v_cache.unsqueeze(0))
            a = a.squeeze(0).transpose(0, 1).reshape(t, -1)
        x = x + a @ self.o.t()
        return x + self.mlp(F.rms_norm(x, (s.hidden,), self.norm))


def _row(shape: Shape, kind: str, layers_s: float, head_s: float, **point: int) -> dict:
    """One measured step: the held layers scaled to the whole model, plus the LM head."""
    step_s = layers_s * shape.layers / LAYERS_HELD + head_s
    return {"kind": kind, **point, "layers_s": layers_s, "head_s": head_s, "step_s": step_s}


def _time(fn, reps: int) -> float:
    for _ in range(2):
        fn()
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(reps):
        fn()
    end.record()
    torch.cuda.synchronize()
    return start.elapsed_time(end) / reps / 1e3


def measure(shape: Shape, prefill: list[tuple[int, int]], decode: list[tuple[int, int]], reps: int) -> list[dict]:
    layers = [Layer(shape) for _ in range(LAYERS_HELD)]
    head = _w(shape.vocab, shape.hidden)
    rows = []
    for t, c in prefill:
        kv = [(_w(shape.kv_heads, c + t, shape.head_dim), _w(shape.kv_heads, c + t, shape.head_dim)) for _ in layers]
        x0 = _w(t, shape.hidden)

        def step(x0=x0, kv=kv) -> None:
            x = x0
            for layer, (kc, vc) in zip(layers, kv, strict=True):
                x = layer.forward(x, kc, vc, decode=False)

        sec = _time(step, reps)
        head_s = _time(lambda x0=x0: x0[-1:] @ head.t(), reps)
        rows.append(_row(shape, "prefill", sec, head_s, new_tokens=t, cached=c))
        print(f"{shape.name} prefill T={t} C={c}: {rows[-1]['step_s'] * 1e3:.2f} ms", flush=True)
        del kv
    for b, ctx in decode:
        kv = [(_w(b, shape.kv_heads, ctx, shape.head_dim), _w(b, shape.kv_heads, ctx, shape.head_dim)) for _ in layers]
        x0 = _w(b, shape.hidden)
        out = torch.empty(b, shape.vocab, device=DEVICE, dtype=torch.bfloat16)

        def step(x0=x0, kv=kv) -> None:
            x = x0
            for layer, (kc, vc) in zip(layers, kv, strict=True):
                x = layer.forward(x, kc, vc, decode=True)

        step()
        torch.cuda.synchronize()
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            step()
        sec = _time(graph.replay, reps)
        head_s = _time(lambda x0=x0, out=out: torch.matmul(x0, head.t(), out=out), reps)
        rows.append(_row(shape, "decode", sec, head_s, batch=b, context=ctx))
        print(f"{shape.name} decode B={b} L={ctx}: {rows[-1]['step_s'] * 1e3:.2f} ms", flush=True)
        del graph, kv
        torch.cuda.empty_cache()
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", required=True)
    ap.add_argument("--reps", type=int, default=10)
    ap.add_argument("--shapes", default=",".join(SHAPES))
    args = ap.parse_args()
    if not torch.cuda.is_available():
        sys.exit("gpu_step_times.py needs a CUDA device")
    torch.manual_seed(0)
    prefill = [(t, c) for t in (128, 512, 1024, 2048, 4096, 8192) for c in (0, 4096, 16384, 49152)]
    decode = [
        (b, ctx) for b in (1, 4, 16, 32, 64, 128, 256) for ctx in (512, 2048, 8192, 32768) if b * ctx <= 2_200_000
    ]
    report = {
        "device": torch.cuda.get_device_name(),
        "torch": torch.__version__,
        "layers_held": LAYERS_HELD,
        "started": time.strftime("%Y-%m-%d %H:%M:%S"),
        "shapes": {},
    }
    for name in args.shapes.split(","):
        shape = SHAPES[name]
        report["shapes"][name] = {"shape": asdict(shape), "rows": measure(shape, prefill, decode, args.reps)}
        torch.cuda.empty_cache()
    with open(args.out, "w") as f:
        json.dump(report, f, indent=1)


if __name__ == "__main__":
    main()
