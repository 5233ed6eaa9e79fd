"""Fused MLP (kernels/mlp.py) against cuBLAS, torch.compile of the unfused math, and eager.

Kernel-level modes (the two Triton kernels alone):
  up+act    post = leaky_relu(x @ w_up.T, 0.5)^2       bar: the cuBLAS GEMM x @ w_up.T alone
  act-grad  dpre = (dY @ w_down) * f'(pre)             bar: the cuBLAS GEMM dY @ w_down alone
Whole-MLP modes (up, activation, down and all three gradients):
  fwd, bwd, fwd+bwd                                    bar: the same GEMMs in cuBLAS, nothing else
Baseline for every ratio: torch.compile of the unfused math (the honest competitor). "ours" runs the
fused op inside torch.compile (as training does), "ours-eager" calls it directly. fwd+bwd at M = 16384
is also timed as CUDA-graph replays ("graph" cases): plain minus graph is the per-call host cost.
Shapes: K = 512, N = 2048 and M in {16384, 65536, 98304} tokens (98304 = one record micro-batch).
--quick: M = 98304 only, and of the whole-MLP modes fwd+bwd only (fwd and bwd are its two halves):
every torch.compile'd provider is a compilation of its own, and compiling is most of a quick run.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

import kernels.mlp as mlp
from bench.registry import Case, Provider, needs_cuda, needs_our_kernels, register

K, N = 512, 2048
BF16 = 2  # bytes
PROVIDERS = ("eager", "compile", "cublas", "ours", "ours-eager")


def _operands(M: int, requires_grad: bool = False):
    x = torch.randn(M, K, device="cuda", dtype=torch.bfloat16)
    w_up = (torch.randn(N, K, device="cuda") / K**0.5).bfloat16()
    w_down = (torch.randn(K, N, device="cuda") / N**0.5).bfloat16()
    g = torch.randn(M, K, device="cuda", dtype=torch.bfloat16)
    if requires_grad:
        for t in (x, w_up, w_down):
            t.requires_grad_()
    return x, w_up, w_down, g


def _up_act(x, w_up):
    return F.leaky_relu(x @ w_up.t(), 0.5).square()


def _act_grad(g, w_down, pre):
    return (g @ w_down) * torch.where(pre > 0, 2 * pre, 0.5 * pre)


def _kernel_setup(M: int, mode: str, provider: str):
    def setup():
        x, w_up, w_down, g = _operands(M)
        if mode == "up+act":
            if provider == "cublas":
                return lambda: x @ w_up.t()
            if provider == "ours":  # outputs allocated per call, as every other provider does
                return lambda: mlp.up_act(x, w_up)
            fn = torch.compile(_up_act) if provider == "compile" else _up_act
            return lambda: fn(x, w_up)
        # act-grad: the saved state each provider would have from its own forward
        if provider == "cublas":
            return lambda: g @ w_down
        if provider == "ours":
            post, signs = mlp.up_act(x, w_up)
            return lambda: mlp.act_grad(g, w_down, post, signs)
        pre = x @ w_up.t()
        fn = torch.compile(_act_grad) if provider == "compile" else _act_grad
        return lambda: fn(g, w_down, pre)

    return setup


def _gemms_only(mode: str, x, w_up, w_down, g):
    """The whole MLP's GEMMs in cuBLAS with no activation work: the floor for any fusion."""
    h = x @ w_up.t()

    def fwd():
        return (x @ w_up.t()) @ w_down.t()

    def bwd():
        dpre = g @ w_down
        return dpre @ w_up, dpre.t() @ x, g.t() @ h

    return {"fwd": fwd, "bwd": bwd, "fwd+bwd": lambda: (fwd(), bwd())}[mode]


def _whole_setup(M: int, mode: str, provider: str):
    def setup():
        x, w_up, w_down, g = _operands(M, requires_grad=provider != "cublas")
        if provider == "cublas":
            return _gemms_only(mode, x.detach(), w_up.detach(), w_down.detach(), g)
        # "ours" is the fused op inside a torch.compile graph, as training runs it; "ours-eager" calls
        # it directly (already fused: nothing for the compiler to do but add its own per-call cost).
        if provider == "ours":
            fn = torch.compile(lambda a, b, c: mlp.fused_mlp(a, b, c, impl="triton"), fullgraph=True)
        elif provider == "ours-eager":
            fn = lambda a, b, c: mlp.fused_mlp(a, b, c, impl="triton")  # noqa: E731
        else:
            fn = (
                torch.compile(mlp.fused_mlp_ref, fullgraph=True)
                if provider == "compile"
                else mlp.fused_mlp_ref
            )
        inputs = (x, w_up, w_down)
        if mode == "fwd":
            return lambda: fn(*inputs)
        if mode == "fwd+bwd":
            return lambda: torch.autograd.grad(fn(*inputs), inputs, g)

        # bwd alone: one forward, then time backward passes over its retained graph. AOTAutograd's
        # donated buffers forbid retain_graph; the backward is compiled lazily, at the first call.
        def no_donation(f):
            def run():
                with torch._functorch.config.patch(donated_buffer=False):
                    return f()

            return run

        out = no_donation(lambda: fn(*inputs))()
        return no_donation(lambda: torch.autograd.grad(out, inputs, g, retain_graph=True))

    return setup


# FLOPs of one call, in units of one M x N x K GEMM (2*M*N*K)
GEMMS = {"up+act": 1, "act-grad": 1, "fwd": 2, "bwd": 4, "fwd+bwd": 6}


def _min_bytes(mode: str, M: int) -> float:
    """Inputs read once and outputs written once; a backward must read at least one saved M x N tensor."""
    x, w, h = M * K, N * K, M * N
    elems = {
        "up+act": x + w + h,
        "act-grad": x + w + 2 * h,
        "fwd": 2 * x + 2 * w,
        "bwd": 3 * x + 4 * w + h,
        "fwd+bwd": 3 * x + 4 * w,
    }[mode]
    return BF16 * elems


# M at which the per-call host cost shows: the whole MLP fwd+bwd is timed there a second time as
# CUDA-graph replays (no host work at all), so plain minus graph is what each call costs the CPU.
OVERHEAD_M = 16384


@register("mlp", "Fused MLP kernels vs cuBLAS, torch.compile and eager (K=512, N=2048, bf16)")
def cases(quick: bool) -> list[Case]:
    sizes = [98304] if quick else [16384, 65536, 98304]
    out = []
    for mode in ("up+act", "act-grad", "fwd+bwd") if quick else GEMMS:
        kernel_mode = mode in ("up+act", "act-grad")
        make = _kernel_setup if kernel_mode else _whole_setup
        names = ("eager", "compile", "cublas", "ours") if kernel_mode else PROVIDERS
        for M, graph in [(M, False) for M in sizes] + ([(OVERHEAD_M, True)] if mode == "fwd+bwd" else []):
            providers = [
                Provider(name, make(M, mode, name), needs_our_kernels if "ours" in name else needs_cuda)
                for name in names
            ]
            out.append(
                Case(
                    suite="mlp",
                    label=f"{mode}{' graph' if graph else ''} M={M}",
                    params={"mode": mode + (" (graph replay)" if graph else ""), "M": M, "K": K, "N": N},
                    flops=GEMMS[mode] * 2.0 * M * N * K,
                    bytes=_min_bytes(mode, M),
                    providers=providers,
                    baseline="compile",
                    x="M",
                    series=("mode",),
                    cuda_graph=graph,
                    notes="cublas = the GEMM(s) alone, no activation work"
                    + ("; timed as CUDA-graph replays: no host cost" if graph else ""),
                )
            )
    return out
