"""Fused MLP: the Triton kernels against fp64 references (interpreter tier) and bf16 math (GPU tier)."""

from __future__ import annotations

import logging

import pytest
import torch
import torch.nn.functional as F

import kernels._runtime as runtime
import kernels.mlp as mlp
from kernels import fused_mlp, fused_mlp_ref


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.double() - b.double()).norm() / b.double().norm()).item()


def make_operands(M, K, N, dtype, device, lead=()):
    x = torch.randn(*lead, M, K, dtype=dtype, device=device)
    w_up = (torch.randn(N, K, device=device) / K**0.5).to(dtype)
    w_down = (torch.randn(K, N, device=device) / N**0.5).to(dtype)
    return x, w_up, w_down


def grads(fn, inputs, grad_out):
    leaves = [t.detach().clone().requires_grad_() for t in inputs]
    out = fn(*leaves)
    out.backward(grad_out.to(out.dtype))
    return out.detach(), [t.grad for t in leaves]


# Relative Frobenius tolerances against fp64 on the same inputs. fp32: K-term fp32 sums, ~sqrt(K)*eps
# (K <= 96) with margin. fp16: post and dpre are rounded to fp16 once (half-ULP 2^-11 ~ 4.9e-4 max,
# smaller in RMS); the bound is four of those.
TOL = {torch.float32: 1e-5, torch.float16: 2e-3}

SHAPES = [  # (lead dims, M, K, N): batch 1, M not a multiple of the tile, N ragged, 3-D input
    ((), 1, 64, 64),
    ((), 77, 64, 128),
    ((), 199, 96, 320),
    ((2,), 37, 64, 192),
]


@pytest.mark.interpreter
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("lead,M,K,N", SHAPES)
def test_forward_and_gradients_match_fp64(kernel_device, dtype, lead, M, K, N):
    x, w_up, w_down = make_operands(M, K, N, dtype, kernel_device, lead)
    g = torch.randn(*lead, M, K, device=kernel_device)
    out, (dx, dw_up, dw_down) = grads(lambda *t: fused_mlp(*t, impl="triton"), (x, w_up, w_down), g)
    ref, ref_grads = grads(fused_mlp_ref, [t.double() for t in (x, w_up, w_down)], g.double())
    assert out.shape == ref.shape and out.dtype == dtype
    names = ("out", "dx", "dw_up", "dw_down")
    for name, got, want in zip(names, (out, dx, dw_up, dw_down), (ref, *ref_grads)):
        assert torch.isfinite(got).all(), name
        assert rel_err(got, want) < TOL[dtype], (name, rel_err(got, want))
    if dtype == torch.float16:  # and no worse than twice the same math in fp16 PyTorch
        eager, eager_grads = grads(fused_mlp_ref, (x, w_up, w_down), g)
        for got, e, want in zip((out, dx, dw_up, dw_down), (eager, *eager_grads), (ref, *ref_grads)):
            assert rel_err(got, want) <= 2 * rel_err(e, want) + 1e-6


@pytest.mark.interpreter
@pytest.mark.parametrize("M,K,N", [(77, 64, 128), (33, 32, 96)])
def test_kernels_write_every_element(kernel_device, M, K, N):
    """Both kernels on poisoned outputs: every element written, sign bits exact, f' exact."""
    x, w_up, w_down = make_operands(M, K, N, torch.float32, kernel_device)
    pre = x.double() @ w_up.double().t()
    post = torch.full((M, N), float("nan"), device=kernel_device)
    signs = torch.full((M, mlp.sign_words(N)), -1, dtype=torch.int32, device=kernel_device)
    mlp.up_act(x, w_up, post, signs)
    assert not post.isnan().any()
    assert rel_err(post, F.leaky_relu(pre, 0.5).square()) < TOL[torch.float32]
    col = torch.arange(N, device=kernel_device)
    bits = (signs[:, col // 32] >> (col % 32)) & 1
    assert torch.equal(bits.bool(), pre > 0)

    g = torch.randn(M, K, device=kernel_device)
    dpre = torch.full((M, N), float("nan"), device=kernel_device)
    mlp.act_grad(g, w_down, post, signs, out=dpre)
    want = (g.double() @ w_down.double()) * torch.where(pre > 0, 2 * pre, 0.5 * pre)
    assert not dpre.isnan().any()
    assert rel_err(dpre, want) < TOL[torch.float32]


@pytest.mark.interpreter
def test_bank_slices_receive_gradients(kernel_device):
    """Weights as slices of 3-D banks, as the model passes them; grads land in the right slice."""
    L, M, K, N = 3, 45, 64, 128
    up_bank = (torch.randn(L, N, K, device=kernel_device) / K**0.5).requires_grad_()
    down_bank = (torch.randn(L, K, N, device=kernel_device) / N**0.5).requires_grad_()
    x = torch.randn(M, K, device=kernel_device)
    fused_mlp(x, up_bank[1], down_bank[1], impl="triton").square().sum().backward()
    ref_up, ref_down = up_bank.detach().clone().requires_grad_(), down_bank.detach().clone().requires_grad_()
    fused_mlp_ref(x, ref_up[1], ref_down[1]).square().sum().backward()
    for got, want in ((up_bank.grad, ref_up.grad), (down_bank.grad, ref_down.grad)):
        assert torch.equal(got[0], torch.zeros_like(got[0])) and torch.equal(got[2], torch.zeros_like(got[2]))
        assert rel_err(got[1], want[1]) < TOL[torch.float32]


@pytest.mark.interpreter
def test_compiles_fullgraph(kernel_device):
    """The op is opaque to torch.compile: no graph break, same values as eager."""
    x, w_up, w_down = make_operands(40, 64, 128, torch.float32, kernel_device)
    w_up.requires_grad_()

    def loss(x, w_up, w_down):
        return fused_mlp(x, w_up, w_down, impl="triton").square().mean()

    backend = "aot_eager" if kernel_device.type == "cpu" else "inductor"
    compiled = torch.compile(loss, fullgraph=True, backend=backend)
    got = compiled(x, w_up, w_down)
    (g_got,) = torch.autograd.grad(got, w_up)
    want = loss(x, w_up, w_down)
    (g_want,) = torch.autograd.grad(want, w_up)
    assert torch.allclose(got, want, rtol=1e-6) and torch.allclose(g_got, g_want, rtol=1e-5, atol=1e-7)


@pytest.mark.interpreter
def test_misaligned_input_falls_back_or_raises(kernel_device, caplog, monkeypatch):
    monkeypatch.setattr(runtime, "_logged", set())  # see the fallback message even if logged before
    M, K, N = 16, 64, 128
    _, w_up, w_down = make_operands(M, K, N, torch.float32, kernel_device)
    x = torch.randn(M * K + 1, device=kernel_device)[1:].view(M, K)  # 4-byte offset: not TMA-aligned
    with pytest.raises(ValueError, match="x starts at an address"):
        fused_mlp(x, w_up, w_down, impl="triton")
    with caplog.at_level(logging.INFO, logger="golfbench.kernels"):
        out = fused_mlp(x, w_up, w_down, impl="auto")
    assert torch.equal(out, fused_mlp_ref(x, w_up, w_down))
    assert "not 16-byte aligned" in caplog.text


@pytest.mark.interpreter
@pytest.mark.parametrize(
    "K,N,match",
    [(60, 128, r"K = x.shape\[-1\] = 60"), (64, 100, r"N = w_up.shape\[0\] = 100")],
)
def test_forced_triton_on_impossible_shape_names_the_dim(kernel_device, K, N, match):
    x, w_up, w_down = make_operands(8, K, N, torch.float16, kernel_device)
    with pytest.raises(ValueError, match=match):
        fused_mlp(x, w_up, w_down, impl="triton")
    assert torch.equal(fused_mlp(x, w_up, w_down, impl="auto"), fused_mlp_ref(x, w_up, w_down))


def test_reference_impl_is_the_reference():
    x, w_up, w_down = make_operands(10, 16, 24, torch.float32, "cpu")
    assert torch.equal(fused_mlp(x, w_up, w_down, impl="torch"), fused_mlp_ref(x, w_up, w_down))
    want = x @ w_up.t()
    want = torch.where(want > 0, want, 0.5 * want) ** 2 @ w_down.t()
    assert torch.allclose(fused_mlp_ref(x, w_up, w_down), want, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize(
    "w_up_shape,w_down_shape,match",
    [
        ((24, 15), (16, 24), "w_up.shape"),
        ((24, 16), (24, 16), "w_down has shape"),
        ((24, 16, 1), (16, 24), "2-D"),
    ],
)
def test_bad_shapes_raise(w_up_shape, w_down_shape, match):
    with pytest.raises(ValueError, match=match):
        fused_mlp(torch.randn(4, 16), torch.randn(w_up_shape), torch.randn(w_down_shape))


def test_bad_impl_and_dtype_mismatch_raise():
    x, w_up, w_down = make_operands(4, 16, 24, torch.float32, "cpu")
    with pytest.raises(ValueError, match="impl must be"):
        fused_mlp(x, w_up, w_down, impl="cuda")
    with pytest.raises(ValueError, match="dtypes differ"):
        fused_mlp(x, w_up.double(), w_down)


def test_cpu_without_interpreter_uses_reference_and_says_why(monkeypatch, caplog):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    x, w_up, w_down = make_operands(4, 16, 24, torch.float32, "cpu")
    with pytest.raises(ValueError, match="TRITON_INTERPRET is not set"):
        fused_mlp(x, w_up, w_down, impl="triton")
    monkeypatch.setattr(runtime, "_logged", set())
    with caplog.at_level(logging.INFO, logger="golfbench.kernels"):
        out = fused_mlp(x, w_up, w_down)
    assert torch.equal(out, fused_mlp_ref(x, w_up, w_down))
    assert "TRITON_INTERPRET is not set" in caplog.text


# ---------------------------------------------------------------------------------------------- GPU


@pytest.mark.gpu
@pytest.mark.parametrize("M", [16384, 65536, 98304])
def test_bf16_record_shapes_against_fp32_math(M):
    """bf16 at the record's shapes: every saved/produced tensor within 4e-3 of fp32 math on the same
    bf16 inputs, and no worse than twice the same math in eager bf16."""
    K, N = 512, 2048
    x, w_up, w_down = make_operands(M, K, N, torch.bfloat16, "cuda")
    g = torch.randn(M, K, device="cuda", dtype=torch.bfloat16)
    out, got_grads = grads(lambda *t: fused_mlp(*t, impl="triton"), (x, w_up, w_down), g)
    want, want_grads = grads(fused_mlp_ref, [t.float() for t in (x, w_up, w_down)], g.float())
    eager, eager_grads = grads(fused_mlp_ref, (x, w_up, w_down), g)
    pairs = list(zip((out, *got_grads), (want, *want_grads), (eager, *eager_grads)))

    post, signs = mlp.up_act(x, w_up)
    dpre = mlp.act_grad(g, w_down, post, signs)
    pre32 = x.float() @ w_up.float().t()
    pre16 = x @ w_up.t()
    pairs.append((post, F.leaky_relu(pre32, 0.5).square(), F.leaky_relu(pre16, 0.5).square()))
    dpre32 = (g.float() @ w_down.float()) * torch.where(pre32 > 0, 2 * pre32, 0.5 * pre32)
    pairs.append((dpre, dpre32, (g @ w_down) * torch.where(pre16 > 0, 2 * pre16, 0.5 * pre16)))
    for i, (got, ref, bf16_eager) in enumerate(pairs):
        err, err_eager = rel_err(got, ref), rel_err(bf16_eager, ref)
        assert err <= 4e-3 and err <= 2 * err_eager, (i, err, err_eager)


@pytest.mark.gpu
def test_compiled_fullgraph_inductor_with_bank_slices():
    K, N, L = 512, 2048, 3
    up = torch.nn.Parameter(torch.randn(L, N, K, device="cuda") / K**0.5)
    down = torch.nn.Parameter(torch.randn(L, K, N, device="cuda") / N**0.5)
    x = torch.randn(4, 1024, K, device="cuda", dtype=torch.bfloat16)

    def loss(x):
        return fused_mlp(x, up[1].bfloat16(), down[1].bfloat16()).float().square().mean()

    compiled = torch.compile(loss, fullgraph=True, dynamic=False)
    got = compiled(x)
    got.backward()
    g_compiled = up.grad.clone()
    up.grad = None
    want = loss(x)
    want.backward()
    # Inductor fuses the loss's square-and-mean (another fp32 summation order) and its bf16 grad
    # elementwise math, so agreement is to rounding: fp32 for the loss, the bf16 budget for the grad.
    assert got.item() == pytest.approx(want.item(), rel=1e-5)
    assert rel_err(g_compiled, up.grad) < 4e-3


@pytest.mark.gpu
def test_gpu_misaligned_input_falls_back():
    K, N, M = 512, 2048, 256
    _, w_up, w_down = make_operands(M, K, N, torch.bfloat16, "cuda")
    x = torch.randn(M * K + 1, device="cuda", dtype=torch.bfloat16)[1:].view(M, K)
    with pytest.raises(ValueError, match="x starts at an address"):
        fused_mlp(x, w_up, w_down, impl="triton")
    assert torch.equal(fused_mlp(x, w_up, w_down), fused_mlp_ref(x, w_up, w_down))


@pytest.mark.gpu
def test_cached_launch_matches_the_jit_launch():
    """From the second launch of a specialisation on, the cached CompiledKernel runs: same bits."""
    mlp._compiled.clear()
    for M in (77, 4096):  # ragged and tile-aligned M: two specialisations
        x, w_up, w_down = make_operands(M, 512, 2048, torch.bfloat16, "cuda")
        first = [t.clone() for t in mlp.up_act(x, w_up)]
        assert all(torch.equal(a, b) for a, b in zip(first, mlp.up_act(x, w_up)))
        g = torch.randn(M, 512, device="cuda", dtype=torch.bfloat16)
        dpre = mlp.act_grad(g, w_down, *first).clone()
        assert torch.equal(dpre, mlp.act_grad(g, w_down, *first))
    assert len(mlp._compiled) == 4
