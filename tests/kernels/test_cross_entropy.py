"""Fused softcapped cross-entropy against its reference (DESIGN.md section 4).

Tolerances: the kernel accumulates in fp32, so the loss (fp32 for every input dtype) is held to
fp32 accuracy against fp64 (sums of V terms: ~sqrt(V) * eps_fp32 ~ 1e-5 at V = 8192). The gradient
is written in the logits' dtype, so its error is one rounding of that dtype (fp16: 2^-11 ~ 4.9e-4).
"""

from __future__ import annotations

import logging

import pytest
import torch
import torch.nn.functional as F

from kernels import _runtime
from kernels.cross_entropy import softcapped_cross_entropy, softcapped_cross_entropy_ref

SOFTCAP = 30.0
FP32_LOSS_TOL = 1e-5
GRAD_TOL = {torch.float32: 1e-5, torch.float16: 1e-3}


def rel_err(x: torch.Tensor, ref: torch.Tensor) -> float:
    return ((x.double() - ref.double()).norm() / ref.double().norm()).item()


def make_inputs(n, vocab, dtype, device, scale=10.0):
    logits = (torch.randn(n, vocab, device=device) * scale).to(dtype)
    targets = torch.randint(0, vocab, (n,), device=device)
    return logits, targets


def fp64_loss_and_grad(logits, targets, reduction, grad_out):
    z = logits.detach().double().requires_grad_()
    loss = softcapped_cross_entropy_ref(z, targets, SOFTCAP, reduction)
    (grad,) = torch.autograd.grad(loss, z, grad_out.double())
    return loss.detach(), grad


@pytest.fixture
def poisoned_outputs():
    """Every output buffer the launchers allocate starts as NaN; tests then assert it was overwritten."""
    with _runtime.poisoned_outputs():
        yield


# ------------------------------------------------------------------------------------------------
# Interpreter tier: the real kernels (TRITON_INTERPRET=1 on CPU, or a Hopper GPU), small shapes
# ------------------------------------------------------------------------------------------------


@pytest.mark.interpreter
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=["fp32", "fp16"])
@pytest.mark.parametrize("n,vocab", [(1, 8192), (77, 1000), (199, 1000)])
@pytest.mark.parametrize("reduction", ["mean", "none"])
def test_kernel_matches_fp64(kernel_device, poisoned_outputs, dtype, n, vocab, reduction):
    logits, targets = make_inputs(n, vocab, dtype, kernel_device)
    logits.requires_grad_()
    grad_out = torch.randn(() if reduction == "mean" else (n,), device=kernel_device)

    loss = softcapped_cross_entropy(logits, targets, SOFTCAP, reduction, impl="triton")
    (grad,) = torch.autograd.grad(loss, logits, grad_out)
    ref_loss, ref_grad = fp64_loss_and_grad(logits, targets, reduction, grad_out)

    assert loss.dtype == torch.float32 and loss.shape == ref_loss.shape
    assert grad.dtype == dtype and grad.shape == logits.shape
    assert torch.isfinite(loss).all() and torch.isfinite(grad).all(), "an output element was not written"
    assert rel_err(loss, ref_loss) < FP32_LOSS_TOL
    assert rel_err(grad, ref_grad) < GRAD_TOL[dtype]


@pytest.mark.interpreter
def test_kernel_extreme_logits(kernel_device):
    """Saturated tanh at both ends (including +-inf) must neither overflow nor lose the gradient's tail."""
    n, vocab = 6, 300
    logits = torch.randn(n, vocab, device=kernel_device) * 10
    logits[0, :50] = 1e4
    logits[1, :50] = -1e4
    logits[2, 7] = float("inf")
    logits[3, 9] = float("-inf")
    logits[4] = 200.0 * torch.randn(vocab, device=kernel_device)  # tanh'(z/c) ~ exp(-2|z|/c) underflows
    targets = torch.randint(0, vocab, (n,), device=kernel_device)
    targets[2], targets[3] = 7, 9
    logits.requires_grad_()
    grad_out = torch.rand(n, device=kernel_device)

    loss = softcapped_cross_entropy(logits, targets, SOFTCAP, "none", impl="triton")
    (grad,) = torch.autograd.grad(loss, logits, grad_out)
    ref_loss, ref_grad = fp64_loss_and_grad(logits, targets, "none", grad_out)
    assert torch.isfinite(loss).all() and torch.isfinite(grad).all()
    assert rel_err(loss, ref_loss) < FP32_LOSS_TOL
    assert rel_err(grad, ref_grad) < FP32_LOSS_TOL


@pytest.mark.interpreter
def test_kernel_bad_target_poisons_only_its_row(kernel_device):
    logits, targets = make_inputs(3, 100, torch.float32, kernel_device)
    targets[1] = 100  # out of range: no host sync to detect it, so the row's loss says so instead
    loss = softcapped_cross_entropy(logits, targets, SOFTCAP, "none", impl="triton")
    assert torch.isnan(loss[1]) and torch.isfinite(loss[[0, 2]]).all()


@pytest.mark.interpreter
def test_compile_fullgraph(kernel_device):
    """The custom ops trace with no graph break, forward and backward (aot_eager keeps CPU CI fast)."""
    logits, targets = make_inputs(33, 500, torch.float32, kernel_device)
    logits.requires_grad_()
    fn = lambda z, t: softcapped_cross_entropy(z, t, SOFTCAP, "mean", impl="triton")
    backend = "inductor" if kernel_device.type == "cuda" else "aot_eager"
    compiled = torch.compile(fn, fullgraph=True, backend=backend)
    loss_c = compiled(logits, targets)
    (grad_c,) = torch.autograd.grad(loss_c, logits)
    loss_e = fn(logits, targets)
    (grad_e,) = torch.autograd.grad(loss_e, logits)
    torch.testing.assert_close(loss_c, loss_e, rtol=1e-6, atol=0)
    torch.testing.assert_close(grad_c, grad_e, rtol=1e-6, atol=1e-9)


# ------------------------------------------------------------------------------------------------
# CPU tier: the reference and the argument checks
# ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("reduction", ["mean", "none"])
def test_reference_is_softcapped_fp32_cross_entropy(reduction):
    logits, targets = make_inputs(64, 257, torch.bfloat16, "cpu")
    expected = F.cross_entropy(SOFTCAP * torch.tanh(logits.float() / SOFTCAP), targets, reduction=reduction)
    got = softcapped_cross_entropy(logits, targets, SOFTCAP, reduction, impl="torch")
    assert got.dtype == torch.float32
    torch.testing.assert_close(got, expected, rtol=0, atol=0)
    # and the softcap is not a no-op at this scale
    assert not torch.allclose(got, F.cross_entropy(logits.float(), targets, reduction=reduction))


def test_reference_rejects_out_of_range_targets():
    logits, targets = make_inputs(4, 10, torch.float32, "cpu")
    targets[2] = 10
    with pytest.raises((IndexError, RuntimeError)):
        softcapped_cross_entropy(logits, targets, impl="torch")


@pytest.mark.parametrize(
    "kwargs,match",
    [
        (dict(logits=torch.randn(2, 3, 5)), "logits must be a 2-D"),
        (dict(logits=torch.randn(0, 5), targets=torch.zeros(0, dtype=torch.long)), "at least one row"),
        (dict(logits=torch.randint(0, 5, (4, 5))), "floating-point"),
        (dict(targets=torch.zeros(5, dtype=torch.long)), r"targets must have shape \(N,\)"),
        (dict(targets=torch.zeros(4, 1, dtype=torch.long)), r"targets must have shape \(N,\)"),
        (dict(targets=torch.zeros(4, dtype=torch.int32)), "targets must be int64"),
        (dict(reduction="sum"), "reduction"),
        (dict(impl="cuda"), "impl"),
        (dict(softcap=0.0), "softcap"),
        (dict(softcap=100.0), "softcap"),
    ],
)
def test_bad_arguments_raise(kwargs, match):
    args = dict(logits=torch.randn(4, 5), targets=torch.randint(0, 5, (4,)))
    args.update(kwargs)
    with pytest.raises(ValueError, match=match):
        softcapped_cross_entropy(**args)


def test_forced_triton_on_impossible_input_names_the_argument():
    targets = torch.randint(0, 8, (8,))
    with pytest.raises(ValueError, match="logits must be contiguous along V"):
        softcapped_cross_entropy(torch.randn(8, 8).t(), targets, impl="triton")
    with pytest.raises(ValueError, match="logits dtype torch.float64"):
        softcapped_cross_entropy(torch.randn(8, 8, dtype=torch.float64), targets, impl="triton")


def test_auto_falls_back_with_reason_logged_once(monkeypatch, caplog):
    monkeypatch.setenv("TRITON_INTERPRET", "0")  # CPU tensors without the interpreter: no kernel
    monkeypatch.setattr(_runtime, "_logged", set())
    logits, targets = make_inputs(5, 7, torch.float32, "cpu")
    with caplog.at_level(logging.INFO, logger="golfbench.kernels"):
        for _ in range(2):
            got = softcapped_cross_entropy(logits, targets)
    torch.testing.assert_close(got, softcapped_cross_entropy_ref(logits, targets), rtol=0, atol=0)
    msgs = [r.getMessage() for r in caplog.records if "softcapped_cross_entropy" in r.getMessage()]
    assert len(msgs) == 1 and "TRITON_INTERPRET" in msgs[0]
    with pytest.raises(ValueError, match="impl='triton' cannot run: logits"):
        softcapped_cross_entropy(logits, targets, impl="triton")


# ------------------------------------------------------------------------------------------------
# GPU tier: bf16 at the record shape (48 x 2048 tokens, vocab 8192)
# ------------------------------------------------------------------------------------------------

RECORD_N, RECORD_V = 48 * 2048, 8192


def _loss_grad(fn, logits, targets, reduction, grad_out, leaf_dtype=None):
    z = logits.detach().to(leaf_dtype or logits.dtype).requires_grad_()
    loss = fn(z, targets, reduction)
    (grad,) = torch.autograd.grad(loss, z, grad_out)
    return loss.detach(), grad


@pytest.mark.gpu
@pytest.mark.parametrize("reduction", ["mean", "none"])
def test_gpu_bf16_record_shape(reduction):
    if torch.cuda.get_device_capability()[0] != 9:
        pytest.skip("the Triton path is for Hopper")
    logits, targets = make_inputs(RECORD_N, RECORD_V, torch.bfloat16, "cuda")
    grad_out = torch.randn(() if reduction == "mean" else (RECORD_N,), device="cuda")

    ours = lambda z, t, r: softcapped_cross_entropy(z, t, SOFTCAP, r, impl="triton")
    fp32 = lambda z, t, r: softcapped_cross_entropy_ref(z, t, SOFTCAP, r)  # fp32 math on the bf16 values
    bf16 = lambda z, t, r: F.cross_entropy(SOFTCAP * torch.tanh(z / SOFTCAP), t, reduction=r)  # all bf16

    loss, grad = _loss_grad(ours, logits, targets, reduction, grad_out)
    # an fp32 leaf, so that the reference gradient is not rounded back to bf16
    ref_loss, ref_grad = _loss_grad(fp32, logits, targets, reduction, grad_out, torch.float32)
    torch.cuda.empty_cache()
    bf_loss, bf_grad = _loss_grad(bf16, logits, targets, reduction, grad_out)

    assert grad.dtype == torch.bfloat16 and torch.isfinite(grad).all() and torch.isfinite(loss).all()
    loss_err, grad_err = rel_err(loss, ref_loss), rel_err(grad, ref_grad)
    bf_loss_err, bf_grad_err = rel_err(bf_loss, ref_loss), rel_err(bf_grad, ref_grad)
    print(f"\n{reduction}: loss err {loss_err:.2e} (bf16 torch {bf_loss_err:.2e}), "
          f"grad err {grad_err:.2e} (bf16 torch {bf_grad_err:.2e})")  # fmt: skip
    assert loss_err <= 4e-3 and loss_err <= 2 * bf_loss_err
    assert grad_err <= 4e-3 and grad_err <= 2 * bf_grad_err


@pytest.mark.gpu
def test_gpu_compiled_fullgraph_inductor():
    if torch.cuda.get_device_capability()[0] != 9:
        pytest.skip("the Triton path is for Hopper")
    logits, targets = make_inputs(8192, RECORD_V, torch.bfloat16, "cuda")
    fn = lambda z, t: softcapped_cross_entropy(z * 1.0, t)  # auto = the kernel on Hopper, inside a graph
    compiled = torch.compile(fn, fullgraph=True)
    loss_c, grad_c = _loss_grad(lambda z, t, r: compiled(z, t), logits, targets, "mean", None)
    loss_e, grad_e = _loss_grad(lambda z, t, r: fn(z, t), logits, targets, "mean", None)
    torch.testing.assert_close(loss_c, loss_e, rtol=1e-6, atol=0)
    torch.testing.assert_close(grad_c, grad_e, rtol=0, atol=0)
