"""Causal GQA attention at the record's shape: every backend this machine has, against PyTorch's own pick.

Shape: 48 x 2048 tokens (one record micro-batch), 8 query heads, 4 KV heads, head dim 64, bf16, causal.
Providers (kernels/attention.py):
  sdpa       F.scaled_dot_product_attention with PyTorch's own backend selection: the baseline, what
             the record's script runs without FA3
  cudnn, flash, efficient, math
             one SDPA backend forced; GQA natively (enable_gqa=True)
  *+expand   the same with K and V repeated to 8 heads first
  fa3        FlashAttention-3 when `flash_attn_interface` imports (skipped otherwise, with the reason)
  fa4        FlashAttention-4 (`pip install '.[fa4]'`; offline: bench/wheels.sh) through our custom ops
             golfbench::fa4_fwd/fa4_bwd: native GQA, (B, T, H, D) in and out (skipped, with the
             reason, when flash-attn-4 does not import)
  flex       FlexAttention (torch.compile'd, causal block mask, enable_gqa)
  auto       what the model runs: the fastest correct backend, measured (kernels.attention "auto")
Each provider's record carries `accuracy`: relative Frobenius errors of the output and of dq, dk, dv
against fp32 math on the same bf16 inputs (batch 2 of the same shape), and the same errors of the
op-by-op bf16 math for scale. flops: causal attention with FlashAttention's convention (QK^T and PV
over the lower triangle; backward 2.5x the forward). bytes: q, k, v read and o written once (fwd);
plus dO read and dq, dk, dv written (fwd+bwd).
"""

from __future__ import annotations

import torch

from bench.registry import Case, Provider, needs_cuda, register

BATCH, SEQ_LEN, HEADS, KV_HEADS, HEAD_DIM = 48, 2048, 8, 4, 64
CHECK_BATCH = 2
BACKENDS = ("sdpa", "cudnn", "flash", "efficient", "cudnn+expand", "flash+expand", "efficient+expand")


def _qkv(batch: int, seed: int):
    gen = torch.Generator(device="cuda").manual_seed(seed)
    return [
        torch.randn(batch, SEQ_LEN, n, HEAD_DIM, device="cuda", generator=gen, dtype=torch.bfloat16)
        for n in (HEADS, KV_HEADS, KV_HEADS)
    ]


def _flex():
    from torch.nn.attention.flex_attention import create_block_mask, flex_attention

    mask = create_block_mask(lambda b, h, q, kv: q >= kv, None, None, SEQ_LEN, SEQ_LEN, device="cuda")
    flex = torch.compile(flex_attention, fullgraph=True, dynamic=False)

    def run(q, k, v):
        out = flex(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), block_mask=mask, enable_gqa=True)
        return out.transpose(1, 2)

    return run


def _fn(impl: str):
    from kernels.attention import causal_attention

    return _flex() if impl == "flex" else (lambda q, k, v: causal_attention(q, k, v, impl))


def _unavailable(impl: str):
    def check() -> str | None:
        from kernels.attention import fa4_import_error, unavailable_reason

        reason = (fa4_import_error() if impl == "fa4" else None) or needs_cuda()
        if reason or impl in ("sdpa", "auto", "flex"):
            return reason

        return unavailable_reason(impl, HEADS, KV_HEADS, HEAD_DIM, "bfloat16", "cuda")

    return check


def _setup(mode: str, impl: str):
    def setup():
        fn = _fn(impl)
        q, k, v = _qkv(BATCH, seed=0)
        if mode == "fwd":
            return lambda: fn(q, k, v)
        g = torch.randn_like(q)
        for t in (q, k, v):
            t.requires_grad_()
        return lambda: torch.autograd.grad(fn(q, k, v), (q, k, v), g)

    return setup


def _accuracy(impl: str):
    def check() -> dict:
        from kernels.attention import causal_attention_ref

        q, k, v = (t.requires_grad_() for t in _qkv(CHECK_BATCH, seed=1))
        g = torch.randn_like(q)

        def errors(fn, inputs):
            out = fn(*inputs)
            grads = torch.autograd.grad(out, inputs, g.to(out.dtype))
            return [t.detach().float() for t in (out, *grads)]

        ref = errors(causal_attention_ref, [t.detach().float().requires_grad_() for t in (q, k, v)])
        rel = lambda a, r: float((a - r).norm() / r.norm())  # noqa: E731
        got, bf16 = errors(_fn(impl), (q, k, v)), errors(causal_attention_ref, (q, k, v))
        names = ("out", "dq", "dk", "dv")
        return {
            "rel_err": dict(zip(names, map(rel, got, ref))),
            "rel_err_bf16_math": dict(zip(names, map(rel, bf16, ref))),
        }

    return check


@register("attention", "causal GQA attention 48x2048, 8/4 heads, d=64, bf16: every backend vs PyTorch's pick")
def cases(quick: bool) -> list[Case]:
    tokens = BATCH * SEQ_LEN
    fwd_flops = 2.0 * BATCH * HEADS * SEQ_LEN**2 * HEAD_DIM
    io = tokens * HEAD_DIM * 2.0  # bytes of one head's worth of one (B, T, head) tensor, bf16
    # quick: PyTorch's pick, the fast backends and the model's choice (no compile of flex); "auto"
    # measures fa4 anyway, so timing it costs no compilation of its own
    impls = (
        ["sdpa", "cudnn", "flash", "fa4", "auto"]
        if quick
        else [*BACKENDS, "fa3", "fa4", "flex", "auto", "math"]
    )
    out = []
    for mode in ("fwd+bwd",) if quick else ("fwd", "fwd+bwd"):
        bwd = mode == "fwd+bwd"
        out.append(
            Case(
                suite="attention",
                label=f"{mode} B={BATCH} T={SEQ_LEN}",
                params={
                    "mode": mode,
                    "batch": BATCH,
                    "seq_len": SEQ_LEN,
                    "heads": HEADS,
                    "kv_heads": KV_HEADS,
                    "head_dim": HEAD_DIM,
                    "tokens": tokens,
                },
                flops=fwd_flops * (3.5 if bwd else 1.0),
                bytes=io * (2 * HEADS + 2 * KV_HEADS) * (2 if bwd else 1),
                providers=[Provider(i, _setup(mode, i), _unavailable(i), check=_accuracy(i)) for i in impls],
                baseline="sdpa",
                series=("mode",),
                notes="accuracy: errors vs fp32 math at batch 2 (rel_err), and the bf16 math's (for scale)",
            )
        )
    return out
