"""Softcapped cross-entropy at the record's LM-head shape: our fused kernel vs the unfused math.

loss = CE(30 * tanh(z / 30), targets) over V = 8192 classes, z bf16 (N, V). The record trains on
98,304 tokens per GPU; smaller N shows how the kernels scale. Providers:
  eager     softcap + .float() + F.cross_entropy, op by op (materialises fp32 softcapped logits)
  compiled  torch.compile of that same unfused math (the baseline: the honest competitor)
  ours      kernels.softcapped_cross_entropy (one pass forward saving lse, one pass backward)
Modes: fwd (loss only, no autograd) and fwd+bwd (torch.autograd.grad of the mean loss: the grad is
freshly allocated each call, never accumulated). bytes = logits read once (+ grad written once for
fwd+bwd): the minimum any implementation must move; ours moves 3 passes for fwd+bwd (the forward
saves only lse, so the backward reads the logits again).
--quick: fwd+bwd (what training runs) at the record's 98,304 rows only.
"""

from __future__ import annotations

import torch

from bench.registry import Case, Provider, needs_cuda, needs_our_kernels, register
from kernels.cross_entropy import softcapped_cross_entropy, softcapped_cross_entropy_ref

VOCAB = 8192
SOFTCAP = 30.0
TOKENS = [16384, 65536, 98304]
QUICK_TOKENS = [98304]
MODES = ["fwd", "fwd+bwd"]


def unfused_ce(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    return softcapped_cross_entropy_ref(logits, targets, SOFTCAP)


def _make_fn(impl: str):
    if impl == "eager":
        return unfused_ce
    if impl == "compiled":
        return torch.compile(unfused_ce, fullgraph=True, dynamic=False)
    return lambda z, t: softcapped_cross_entropy(z, t, SOFTCAP, "mean", impl="triton")


def _setup(n: int, mode: str, impl: str):
    def setup():
        fn = _make_fn(impl)
        # the scale of a trained LM head's logits: tanh is far from linear for a good share of them
        logits = (torch.randn(n, VOCAB, device="cuda") * 8).to(torch.bfloat16)
        targets = torch.randint(0, VOCAB, (n,), device="cuda")
        if mode == "fwd":
            return lambda: fn(logits, targets)
        logits.requires_grad_()
        return lambda: torch.autograd.grad(fn(logits, targets), logits)

    return setup


@register("ce", "softcapped cross-entropy, V=8192 bf16: eager / torch.compile (baseline) / fused Triton")
def cases(quick: bool) -> list[Case]:
    out = []
    for mode in ("fwd+bwd",) if quick else MODES:
        for n in QUICK_TOKENS if quick else TOKENS:
            logits_bytes = 2.0 * n * VOCAB
            out.append(
                Case(
                    suite="ce",
                    label=f"{mode} N={n}",
                    params={"mode": mode, "N": n, "V": VOCAB, "tokens": n, "dtype": "bfloat16"},
                    flops=0.0,
                    bytes=logits_bytes * (2 if mode == "fwd+bwd" else 1),
                    providers=[
                        Provider("eager", _setup(n, mode, "eager"), needs_cuda),
                        Provider("compiled", _setup(n, mode, "compiled"), needs_cuda),
                        Provider("ours", _setup(n, mode, "ours"), needs_our_kernels),
                    ],
                    baseline="compiled",
                    x="N",
                    series=("mode",),
                    notes="bytes: logits read once (+ grad written once); ours reads them twice in fwd+bwd",
                )
            )
    return out
