"""Residual mix + RMSNorm (kernels/residual_norm.py) at the record's width against the op-by-op math.

(h, n) = (sum_i w_i * x_i, rms_norm(h) * s): x_i bf16 (M, D = 512), w_i fp32 (D,) or None. The
record's two arrangements, and one of three inputs:
  entry   (x, x0),      (resid_mix[0], resid_mix[1])    the block entry: x_in and the attention input
  mid     (x_in, a),    (None, attn_scale)             x_mid and the MLP input
  three   (x, y, z),    (w, w, w)                      every input weighted (e.g. a skip folded in)
Providers:
  eager       the reference op by op (kernels.residual_rms_norm_ref: weights cast to bf16, F.rms_norm)
  compiled    torch.compile of that same math (the baseline: the honest competitor)
  ours        kernels.residual_rms_norm inside torch.compile(fullgraph=True), as training runs it
  ours-eager  the same op called directly (already fused: plain minus compiled is the graph's cost)
Modes: fwd (no autograd) and fwd+bwd (torch.autograd.grad of both outputs with random grad_outputs,
for every input and weight: fresh gradients each call, never accumulated). M = 98,304 is one record
micro-batch (48 x 2048).
bytes: the minimal traffic in (M, D) bf16 passes (the (D,) weights are negligible). Forward: each
input read, h and n written (k + 2). Backward: dh and dn read, each dx written (2 + k), and what the
weight gradients need: every weighted input, plus h (or the unweighted inputs) unless all are
weighted. entry and mid: 4 + 6 = 10 passes, three: 5 + 8 = 13. Ours moves exactly that (plus the
fp32 rstd, M x 4 bytes, and ~3 MB of per-channel partial sums per weight).
Accuracy: the eager and ours-eager records carry the relative errors of h, n and every gradient
against fp32 math on the same bf16 inputs (M = 8192).
--quick: fwd+bwd (what training runs), entry and mid, M = 98,304 only.
"""

from __future__ import annotations

import torch

from bench.registry import Case, Provider, needs_cuda, needs_our_kernels, register
from kernels.residual_norm import residual_rms_norm, residual_rms_norm_ref

D = 512
SCALE = 0.5773502691896258  # the record's ln_scale_factor of layer 2, 1 / sqrt(3)
ARRANGEMENTS = {"entry": (True, True), "mid": (False, True), "three": (True, True, True)}
QUICK_ARRANGEMENTS = ("entry", "mid")
TOKENS = [16384, 98304]
QUICK_TOKENS = [98304]
MODES = ["fwd", "fwd+bwd"]
PROVIDERS = ("eager", "compiled", "ours", "ours-eager")
CHECK_M = 8192
BF16 = 2  # bytes


def min_passes(pattern: tuple[bool, ...], mode: str) -> int:
    """(M, D) tensor passes any implementation must move (see the module docstring)."""
    k = len(pattern)
    fwd = k + 2
    if mode == "fwd":
        return fwd
    return fwd + 2 + k + sum(pattern) + (0 if all(pattern) else 1)


def _operands(pattern, m: int, requires_grad: bool, seed: int = 0):
    gen = torch.Generator(device="cuda").manual_seed(seed)
    xs = [torch.randn(m, D, device="cuda", generator=gen).bfloat16() for _ in pattern]
    ws = [1.0 + 0.1 * torch.randn(D, device="cuda", generator=gen) if has else None for has in pattern]
    for t in (*xs, *ws):
        if t is not None:
            t.requires_grad_(requires_grad)
    return xs, ws


def _fn(provider: str):
    ref = lambda xs, ws: residual_rms_norm_ref(xs, ws, SCALE)  # noqa: E731
    ours = lambda xs, ws: residual_rms_norm(xs, ws, SCALE, impl="triton")  # noqa: E731
    if provider == "eager":
        return ref
    if provider == "compiled":
        return torch.compile(ref, fullgraph=True, dynamic=False)
    if provider == "ours":
        return torch.compile(ours, fullgraph=True, dynamic=False)
    return ours


def _leaves(xs, ws):
    return [t for t in (*xs, *ws) if t is not None]


def _setup(pattern, m: int, mode: str, provider: str):
    def setup():
        fn = _fn(provider)
        xs, ws = _operands(pattern, m, requires_grad=mode == "fwd+bwd")
        if mode == "fwd":
            return lambda: fn(xs, ws)
        grad_outs = (torch.randn_like(xs[0]), torch.randn_like(xs[0]))
        leaves = _leaves(xs, ws)
        return lambda: torch.autograd.grad(fn(xs, ws), leaves, grad_outs)

    return setup


def _accuracy(pattern, provider: str):
    def check() -> dict:
        xs, ws = _operands(pattern, CHECK_M, requires_grad=True, seed=1)
        grad_outs = (torch.randn_like(xs[0]), torch.randn_like(xs[0]))

        def outputs(fn, xs, ws):
            h, n = fn(xs, ws)
            grads = torch.autograd.grad((h, n), _leaves(xs, ws), [g.to(h.dtype) for g in grad_outs])
            return [t.detach().float() for t in (h, n, *grads)]

        as32 = lambda t: None if t is None else t.detach().float().requires_grad_()  # noqa: E731
        ref = outputs(_fn("eager"), [as32(x) for x in xs], [as32(w) for w in ws])
        got = outputs(_fn(provider), xs, ws)
        names = ["h", "n", *(f"dx{i}" for i in range(len(xs)))]
        names += [f"dw{i}" for i, w in enumerate(ws) if w is not None]
        rel = lambda a, r: float((a - r).norm() / r.norm())  # noqa: E731
        return {"rel_err": dict(zip(names, map(rel, got, ref)))}

    return check


@register(
    "resnorm",
    "residual mix + RMSNorm, D=512 bf16: eager / torch.compile (baseline) / fused Triton",
    version="2",  # 2: fwd+bwd timed by CUDA-graph replay
)
def cases(quick: bool) -> list[Case]:
    out = []
    for mode in ("fwd+bwd",) if quick else MODES:
        for name in QUICK_ARRANGEMENTS if quick else ARRANGEMENTS:
            pattern = ARRANGEMENTS[name]
            for m in QUICK_TOKENS if quick else TOKENS:
                providers = [
                    Provider(
                        p,
                        _setup(pattern, m, mode, p),
                        needs_our_kernels if p.startswith("ours") else needs_cuda,
                        check=_accuracy(pattern, p) if p in ("eager", "ours-eager") else None,
                    )
                    for p in PROVIDERS
                ]
                out.append(
                    Case(
                        suite="resnorm",
                        label=f"{mode} {name} M={m}",
                        params={
                            "mode": mode,
                            "arrangement": name,
                            "inputs": len(pattern),
                            "weights": sum(pattern),
                            "M": m,
                            "D": D,
                            "tokens": m,
                            "dtype": "bfloat16",
                        },
                        flops=0.0,
                        bytes=BF16 * m * D * min_passes(pattern, mode),
                        providers=providers,
                        baseline="compiled",
                        x="M",
                        series=("mode", "arrangement"),
                        cuda_graph=mode == "fwd+bwd",  # host-bound otherwise (0.8-1.6 ms on the H200)
                        notes=f"bytes: {min_passes(pattern, mode)} (M, D) bf16 passes, the minimum; "
                        "accuracy (eager, ours-eager): errors vs fp32 math at M = 8192",
                    )
                )
    return out
