"""Softcapped cross-entropy at the record's LM-head shape: our fused kernel vs the unfused math and Liger.

loss = CE(30 * tanh(z / 30), targets) over V = 8192 classes, z bf16 (N, V). The record trains on
98,304 tokens per GPU; smaller N shows how the kernels scale. Providers of the logits modes:
  eager       softcap + .float() + F.cross_entropy, op by op (materialises fp32 softcapped logits)
  compiled    torch.compile of that same unfused math (the baseline: the honest competitor)
  ours        kernels.softcapped_cross_entropy (one pass forward saving lse, one pass backward)
  liger       LigerCrossEntropyLoss(softcap=30) (bench/field.py; `pip install '.[liger]'`): gradients
              computed in the forward and written over the logits
Modes: fwd (loss only, no autograd) and fwd+bwd (torch.autograd.grad of the mean loss: the grad is
freshly allocated each call, never accumulated). bytes = logits read once (+ grad written once for
fwd+bwd): the minimum any implementation must move; ours moves 3 passes for fwd+bwd (the forward
saves only lse, so the backward reads the logits again).
Mode linear+ce: the LM head's matmul too, x (N, 512) @ W^T (8192, 512) then the softcapped CE, fwd+bwd
(loss, dx, dW), with providers
  compiled    torch.compile of F.linear + the unfused CE (the baseline)
  ours        F.linear (cuBLAS) + our fused CE, eager
  liger_flce  LigerFusedLinearCrossEntropyLoss(softcap=30): row chunks, the logits never whole
bytes there: x and W read, dx and dW written (the logits need never reach memory); flops: the three
GEMMs (z, dx, dW). Every provider's record carries `accuracy`: relative errors of the loss and of every
gradient against the fp32 math on bf16 inputs of the timed shape (bench/field.py's checks; for the
compiled providers, the very graph that is timed).
--quick: fwd+bwd (what training runs) at the record's 98,304 rows only.
"""

from __future__ import annotations

import functools

import torch
import torch.nn.functional as F

from bench import field
from bench.registry import Case, Provider, needs_cuda, needs_our_kernels, register
from kernels.cross_entropy import softcapped_cross_entropy, softcapped_cross_entropy_ref

VOCAB = 8192
DIM = 512  # the LM head's input width (model_dim)
SOFTCAP = 30.0
TOKENS = [16384, 65536, 98304]
QUICK_TOKENS = [98304]
MODES = ["fwd", "fwd+bwd"]
BF16 = torch.bfloat16


def unfused_ce(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    return softcapped_cross_entropy_ref(logits, targets, SOFTCAP)


def _ours(logits, targets):
    return softcapped_cross_entropy(logits, targets, SOFTCAP, "mean", impl="triton")


# One function per provider for the whole suite: a provider's accuracy check runs the very compiled
# graph that is then timed (checks are at the timed shape).
@functools.cache
def _make_fn(impl: str):
    if impl == "eager":
        return unfused_ce
    if impl == "compiled":
        return torch.compile(unfused_ce, fullgraph=True, dynamic=False)
    return _ours


@functools.cache
def _linear_ce_fn(impl: str):
    if impl == "compiled":
        return torch.compile(
            lambda x, w, t: field.linear_ce_ref(x, w, t, SOFTCAP), fullgraph=True, dynamic=False
        )
    return lambda x, w, t: _ours(F.linear(x, w), t)


def _setup(n: int, mode: str, impl: str):
    def setup():
        fn = _make_fn(impl)
        (logits, targets), _ = field.ce_inputs(n, VOCAB, BF16, mode)
        if mode == "fwd":
            return lambda: fn(logits, targets)
        logits.requires_grad_()
        return lambda: torch.autograd.grad(fn(logits, targets), logits)

    return setup


def _linear_setup(n: int, impl: str):
    def setup():
        fn = _linear_ce_fn(impl)
        (x, w, targets), _ = field.linear_ce_inputs(n, DIM, VOCAB, BF16)
        x.requires_grad_()
        w.requires_grad_()
        return lambda: torch.autograd.grad(fn(x, w, targets), (x, w))

    return setup


def _providers(n: int, mode: str) -> list[Provider]:
    check = lambda impl: field.ce_check(_make_fn(impl), n, VOCAB, SOFTCAP, BF16, mode, n)()  # noqa: E731
    return [
        Provider("eager", _setup(n, mode, "eager"), needs_cuda, check=lambda: check("eager")),
        Provider("compiled", _setup(n, mode, "compiled"), needs_cuda, check=lambda: check("compiled")),
        Provider("ours", _setup(n, mode, "ours"), needs_our_kernels, check=lambda: check("ours")),
        field.liger_cross_entropy(n, VOCAB, SOFTCAP, BF16, mode, check_rows=n),
    ]


def _linear_providers(n: int) -> list[Provider]:
    check = lambda impl: field.linear_ce_check(_linear_ce_fn(impl), n, DIM, VOCAB, SOFTCAP, BF16, n)()  # noqa: E731
    return [
        Provider("compiled", _linear_setup(n, "compiled"), needs_cuda, check=lambda: check("compiled")),
        Provider("ours", _linear_setup(n, "ours"), needs_our_kernels, check=lambda: check("ours")),
        field.liger_fused_linear_cross_entropy(n, DIM, VOCAB, SOFTCAP, BF16, check_rows=n),
    ]


@register(
    "ce", "softcapped cross-entropy, V=8192 bf16: eager / torch.compile (baseline) / fused Triton / Liger"
)
def cases(quick: bool) -> list[Case]:
    out = []
    for mode in ("fwd+bwd",) if quick else [*MODES, "linear+ce"]:
        for n in QUICK_TOKENS if quick else TOKENS:
            params = {"mode": mode, "N": n, "V": VOCAB, "tokens": n, "dtype": "bfloat16"}
            if mode == "linear+ce":
                out.append(
                    Case(
                        suite="ce",
                        label=f"{mode} N={n}",
                        params={**params, "K": DIM},
                        flops=3 * 2.0 * n * DIM * VOCAB,
                        bytes=2.0 * 2 * (n * DIM + VOCAB * DIM),
                        providers=_linear_providers(n),
                        baseline="compiled",
                        x="N",
                        series=("mode",),
                        notes="bytes: x and W read, dx and dW written; flops: the three GEMMs; "
                        "accuracy: errors of loss, dx, dW vs fp32 math",
                    )
                )
                continue
            logits_bytes = 2.0 * n * VOCAB
            out.append(
                Case(
                    suite="ce",
                    label=f"{mode} N={n}",
                    params=params,
                    flops=0.0,
                    bytes=logits_bytes * (2 if mode == "fwd+bwd" else 1),
                    providers=_providers(n, mode),
                    baseline="compiled",
                    x="N",
                    series=("mode",),
                    notes="bytes: logits read once (+ grad written once); ours reads them twice in fwd+bwd; "
                    "accuracy: errors of loss (and dlogits) vs fp32 math",
                )
            )
    return out
