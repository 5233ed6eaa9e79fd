"""XSA (exclusive self attention) at the record's attention shape: our fused kernel vs the unfused math.

out = y - (y . vn) vn per (b, t, h), vn = F.normalize(v) of head h's kv head; y (B, T, 8, 64) and
v (B, T, 4, 64) bf16. The record calls it on every layer (88 calls a training step) at B = 48,
T = 2048; B = 16 shows how the kernels scale. Providers:
  eager     kernels.xsa.exclusive_self_attention_ref, op by op
  compiled  torch.compile of that same reference (the baseline: the honest competitor)
  ours      kernels.xsa.exclusive_self_attention (one pass forward, one pass backward)
Modes: fwd (no autograd) and fwd+bwd (torch.autograd.grad of the output against a fixed random
gradient, dy and dv freshly allocated each call). y is contiguous (B, T, H, D), and at the record shape
also a (B, H, T, D) tensor seen through a transpose ("bhtd"), as an attention backend may hand it over.
bytes = the minimum any implementation must move: fwd reads y, v and writes out; the backward reads the
gradient, y, v and writes dy, dv (fwd+bwd = 5 y-sized + 3 v-sized tensors). Ours moves exactly that.
--quick: fwd+bwd at the record shape only.
"""

from __future__ import annotations

import torch

from bench.registry import Case, Provider, needs_cuda, needs_our_kernels, register
from kernels.xsa import exclusive_self_attention, exclusive_self_attention_ref

SEQ, HEADS, KV_HEADS, HEAD_DIM = 2048, 8, 4, 64
BATCHES = [16, 48]
RECORD_BATCH = 48
MODES = ["fwd", "fwd+bwd"]
BF16 = 2  # bytes


def _make_fn(impl: str):
    if impl == "eager":
        return exclusive_self_attention_ref
    if impl == "compiled":
        return torch.compile(exclusive_self_attention_ref, fullgraph=True, dynamic=False)
    return lambda y, v: exclusive_self_attention(y, v, impl="triton")


def _setup(b: int, mode: str, layout: str, impl: str):
    def setup():
        fn = _make_fn(impl)
        shape = (b, HEADS, SEQ, HEAD_DIM) if layout == "bhtd" else (b, SEQ, HEADS, HEAD_DIM)
        y = torch.randn(shape, device="cuda", dtype=torch.bfloat16)
        y = y.transpose(1, 2) if layout == "bhtd" else y
        v = torch.randn(b, SEQ, KV_HEADS, HEAD_DIM, device="cuda", dtype=torch.bfloat16)
        if mode == "fwd":
            return lambda: fn(y, v)
        grad = torch.randn(b, SEQ, HEADS, HEAD_DIM, device="cuda", dtype=torch.bfloat16)
        y.requires_grad_()
        v.requires_grad_()
        return lambda: torch.autograd.grad(fn(y, v), (y, v), grad)

    return setup


def _case(b: int, mode: str, layout: str) -> Case:
    y_bytes = BF16 * b * SEQ * HEADS * HEAD_DIM
    v_bytes = BF16 * b * SEQ * KV_HEADS * HEAD_DIM
    fwd_bytes = 2 * y_bytes + v_bytes
    bwd_bytes = 3 * y_bytes + 2 * v_bytes
    tag = "" if layout == "contiguous" else f" y={layout}"
    return Case(
        suite="xsa",
        label=f"{mode} B={b}{tag}",
        # the attention suite's names for the same dims
        params=dict(mode=mode, batch=b, seq_len=SEQ, heads=HEADS, kv_heads=KV_HEADS, head_dim=HEAD_DIM)
        | {"layout": layout, "tokens": b * SEQ, "dtype": "bfloat16"},
        flops=0.0,
        bytes=float(fwd_bytes + (bwd_bytes if mode == "fwd+bwd" else 0)),
        providers=[
            Provider("eager", _setup(b, mode, layout, "eager"), needs_cuda),
            Provider("compiled", _setup(b, mode, layout, "compiled"), needs_cuda),
            Provider("ours", _setup(b, mode, layout, "ours"), needs_our_kernels),
        ],
        baseline="compiled",
        x="batch",
        series=("mode", "layout"),
        cuda_graph=mode == "fwd+bwd",  # host-bound otherwise: every provider ~0.75 ms on the H200
        notes="bytes: y, v read, out written (+ grad, y, v read, dy, dv written); ours moves exactly that",
    )


@register(
    "xsa",
    "exclusive self attention, 8/4 heads of 64, bf16: eager / torch.compile (baseline) / Triton",
    version="2",  # 2: fwd+bwd timed by CUDA-graph replay
)
def cases(quick: bool) -> list[Case]:
    if quick:
        return [_case(RECORD_BATCH, "fwd+bwd", "contiguous")]
    out = [_case(b, mode, "contiguous") for mode in MODES for b in BATCHES]
    out.append(_case(RECORD_BATCH, "fwd+bwd", "bhtd"))
    return out
