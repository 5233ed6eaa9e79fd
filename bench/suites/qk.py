"""q/k head RMSNorm + partial RoPE + gain (kernels/qk_rope.py) at the record's attention shapes.

q (48, 2048, 8, 64) with the per-head gain and k (48, 2048, 4, 64) without, bf16, RoPE on the first 16
of 64 dims with fp32 tables, as the model calls it 2 x 88 times per training step. Providers:
  eager     the reference op by op (rms_norm, rotate-half with the tables cast to bf16, gain)
  compiled  torch.compile of the same reference (the baseline: what the model ran before the kernel)
  ours      kernels.qk_norm_rope (one pass forward, one pass backward)
Modes: fwd, and fwd+bwd (torch.autograd.grad of the output w.r.t. x and the gain, fresh grad each call).
bytes: x read + out written (fwd); + grad read, x read again, dx written (fwd+bwd): the fewest passes
an implementation can make (the gain's gradient, 3 MB of per-row partial sums, is not counted).
--quick: fwd+bwd of q (the larger and the one with the gain's gradient).
"""

from __future__ import annotations

import torch

from bench.registry import Case, Provider, needs_cuda, needs_our_kernels, register

BATCH, SEQ_LEN, HEAD_DIM, PAIRS = 48, 2048, 64, 8
TENSORS = {"q": (8, True), "k": (4, False)}  # heads, has gain


def _tables():
    inv_freq = 1.0 / 10000.0 ** (torch.arange(0, 2 * PAIRS, 2, device="cuda").float() / (2 * PAIRS))
    angles = torch.outer(torch.arange(SEQ_LEN, device="cuda").float(), inv_freq)
    return angles.cos(), angles.sin()


def _fn(provider: str):
    from kernels.qk_rope import qk_norm_rope, qk_norm_rope_ref

    if provider == "eager":
        return qk_norm_rope_ref
    if provider == "compiled":
        return torch.compile(qk_norm_rope_ref, fullgraph=True, dynamic=False)
    return lambda x, c, s, g: qk_norm_rope(x, c, s, g, impl="triton")


def _setup(tensor: str, mode: str, provider: str):
    def setup():
        heads, has_gain = TENSORS[tensor]
        fn = _fn(provider)
        x = torch.randn(BATCH, SEQ_LEN, heads, HEAD_DIM, device="cuda").to(torch.bfloat16)
        cos, sin = _tables()
        gain = torch.rand(heads, device="cuda") + 4.5 if has_gain else None
        if mode == "fwd":
            return lambda: fn(x, cos, sin, gain)
        leaves = [x.requires_grad_()] + ([gain.requires_grad_()] if has_gain else [])
        g = torch.randn_like(x)
        return lambda: torch.autograd.grad(fn(x, cos, sin, gain), leaves, g)

    return setup


def _accuracy(tensor: str, provider: str):
    def check() -> dict:
        from kernels.qk_rope import qk_norm_rope_ref

        heads, has_gain = TENSORS[tensor]
        x = torch.randn(4, SEQ_LEN, heads, HEAD_DIM, device="cuda").to(torch.bfloat16)
        cos, sin = _tables()
        gain = torch.rand(heads, device="cuda") + 4.5 if has_gain else None
        g = torch.randn(x.shape, device="cuda")

        def run(fn, xx):
            leaves = [xx.detach().requires_grad_()] + ([gain.detach().requires_grad_()] if has_gain else [])
            out = fn(leaves[0], cos, sin, leaves[1] if has_gain else None)
            return [t.detach().float() for t in (out, *torch.autograd.grad(out, leaves, g.to(out.dtype)))]

        ref, got, bf16 = run(qk_norm_rope_ref, x.float()), run(_fn(provider), x), run(qk_norm_rope_ref, x)
        names = ("out", "dx", "dgain")[: len(ref)]
        rel = lambda a, r: float((a - r).norm() / r.norm())  # noqa: E731
        return {
            "rel_err": dict(zip(names, map(rel, got, ref))),
            "rel_err_bf16_math": dict(zip(names, map(rel, bf16, ref))),
        }

    return check


@register(
    "qk",
    "q/k RMSNorm + partial RoPE + gain, 48x2048 heads of 64, bf16: eager / compile / ours",
    version="2",  # 2: fwd+bwd timed by CUDA-graph replay
)
def cases(quick: bool) -> list[Case]:
    out = []
    for tensor in ("q",) if quick else TENSORS:
        heads = TENSORS[tensor][0]
        one_pass = 2.0 * BATCH * SEQ_LEN * heads * HEAD_DIM  # bytes of one bf16 pass over the tensor
        for mode in ("fwd+bwd",) if quick else ("fwd", "fwd+bwd"):
            out.append(
                Case(
                    suite="qk",
                    label=f"{mode} {tensor} H={heads}",
                    params={
                        "mode": mode,
                        "tensor": tensor,
                        "heads": heads,
                        "batch": BATCH,
                        "seq_len": SEQ_LEN,
                        "head_dim": HEAD_DIM,
                        "rope_dims": 2 * PAIRS,
                    },  # fmt: skip
                    flops=0.0,
                    bytes=one_pass * (5 if mode == "fwd+bwd" else 2),
                    providers=[
                        Provider("eager", _setup(tensor, mode, "eager"), needs_cuda),
                        Provider(
                            "compiled",
                            _setup(tensor, mode, "compiled"),
                            needs_cuda,
                            check=_accuracy(tensor, "compiled"),
                        ),  # fmt: skip
                        Provider(
                            "ours",
                            _setup(tensor, mode, "ours"),
                            needs_our_kernels,
                            check=_accuracy(tensor, "ours"),
                        ),  # fmt: skip
                    ],
                    baseline="compiled",
                    series=("mode",),
                    cuda_graph=mode == "fwd+bwd",  # host-bound otherwise (0.7-0.9 ms on the H200)
                    notes="bytes: the fewest passes (fwd 2, fwd+bwd 5); accuracy vs fp32 math at batch 4",
                )
            )
    return out
